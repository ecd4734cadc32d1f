"""``nepa-scale sweep ACTION SWEEP_FILE``: plan, launch, status, cancel, preempt, attach, each with
only its own options (every action takes --executor, --output-root and --set: they decide the runs
and their ids)."""

from __future__ import annotations

import argparse
import logging

from nepa_scale.cli.errors import fail
from nepa_scale.launch.targets import parse_target_option


def _load(args: argparse.Namespace):
    """The sweep file's runs."""
    from nepa_scale.launch.sweep import load_sweep  # heavy: torch (the runs' plans)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return load_sweep(args.sweep, executor=args.executor, output_root=args.output_root, overrides=args.set)


def cmd_plan(args: argparse.Namespace) -> int:
    from nepa_scale.launch.plan import plan_run, plan_table  # heavy: torch
    from nepa_scale.launch.sweep import load_sweep  # heavy, likewise

    sweep = _load(args)
    against = load_sweep(args.against, executor=args.executor, overrides=args.set) if args.against else None
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs -> {sweep.output_root}")
    plans = [plan_run(run) for run in sweep.runs]
    print(plan_table(sweep, against, comm=args.comm, plans=plans))
    return 1 if any(plan.error for plan in plans) else 0


def cmd_launch(args: argparse.Namespace) -> int:
    from nepa_scale.launch import launcher  # heavy: torch, submitit

    if args.advise:
        return _advise_loop(args)
    if args.budget_gpu_hours is not None or args.until_interval is not None:
        return fail("--budget-gpu-hours and --until-interval go with --advise (the closed loop)", code=2)
    sweep = _load(args)
    if sweep.targets and not args.dry_run:
        from nepa_scale.launch.advice import resolve_targets  # heavy: torch (the planner)

        for target in resolve_targets(sweep):  # recorded in study.json: the report opens with them
            cost = f"{target.gpu_hours:,.4g} GPU-hours" if target.gpu_hours is not None else target.note
            print(f"target {target.label}: N = {target.params:,.0f}, D = {target.images:,.0f} images, {cost}")
    pending = launcher.launch(sweep, retry_failed=args.retry_failed, dry_run=args.dry_run)
    verb = "would submit" if args.dry_run else "submitted"
    print(
        f"{verb} {len(pending)} of {len(sweep.runs)} runs"
        + (": " + ", ".join(r.run_id for r in pending) if pending else "")
    )
    invalid = _not_submitted(sweep, pending, args.sweep)
    if not args.wait or args.dry_run:
        return 1 if invalid else 0
    launcher.wait(sweep)
    return _print_status(sweep, args.sweep)


def _advice_settings(args: argparse.Namespace):
    from nepa_scale.scaling.study import StudySettings  # heavy: pandas, matplotlib

    specs = [parse_target_option(t) for t in args.target] if args.target else None
    return StudySettings(quantity=args.quantity, n_bootstrap=args.bootstrap, seed=args.seed), specs


def _advise_loop(args: argparse.Namespace) -> int:
    from nepa_scale.workflows.advise import advise_loop, check_budget, submit_loop  # heavy: torch, scipy

    if args.budget_gpu_hours is None or args.until_interval is None:
        return fail("--advise needs --budget-gpu-hours and --until-interval", code=2)
    check_budget(args.budget_gpu_hours)
    settings, specs = _advice_settings(args)
    if args.submit:
        job = submit_loop(
            args.sweep,
            args.budget_gpu_hours,
            args.until_interval,
            settings,
            args.rounds,
            specs,
            args.executor,
            args.output_root,
            args.set,
        )
        print(f"submitted the advice loop as job {job}: it requeues itself and goes on where it was")
        return 0
    return advise_loop(_load(args), args.budget_gpu_hours, args.until_interval, settings, args.rounds, specs)


def cmd_advise(args: argparse.Namespace) -> int:
    """The runs that narrow the targets' intervals most per GPU-hour, as a sweep file."""
    from nepa_scale.workflows.advise import check_budget, run_advice  # heavy: torch, scipy

    check_budget(args.budget_gpu_hours)
    settings, specs = _advice_settings(args)
    run_advice(_load(args), args.budget_gpu_hours, settings, specs)
    return 0


def _not_submitted(sweep, pending: list, sweep_file, written_in=None) -> int:
    """Each run a launch left out and why (its state, how to resume it: launching ``sweep_file``);
    the number of invalid runs, whose settings ``written_in`` holds (default: ``sweep_file``)."""
    from nepa_scale.launch.status import not_done_lines, sweep_status  # heavy: torch, submitit

    submitted = {r.run_id for r in pending}
    left = [r for r in sweep_status(sweep) if r.run_id not in submitted]
    for line in not_done_lines(left, sweep_file):
        print(f"not submitted: {line}")
    invalid = sum(r.invalid for r in left)
    if invalid:  # a sweep file with a bad row is not a launch that went well
        print(
            f"{invalid} run(s) of {written_in or sweep_file} are invalid (`nepa-scale sweep plan` names the key)"
        )
    return invalid


def cmd_status(args: argparse.Namespace) -> int:
    return _print_status(_load(args), args.sweep)


def _print_status(sweep, sweep_file: str) -> int:
    """The status table, what stopped and how to resume it; exit 1 if a run failed."""
    from nepa_scale.launch.status import not_done_lines, status_table, sweep_status  # heavy: torch, submitit

    rows = sweep_status(sweep)
    print(status_table(rows))
    for line in not_done_lines(rows, sweep_file):
        print(line)
    return 1 if any(r.state == "failed" for r in rows) else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from nepa_scale.launch import launcher  # heavy: torch, submitit

    cancelled = launcher.cancel(_load(args))
    print(f"cancelled {len(cancelled)} runs" + (": " + ", ".join(cancelled) if cancelled else ""))
    return 0


def cmd_preempt(args: argparse.Namespace) -> int:
    from nepa_scale.launch import launcher  # heavy: torch, submitit

    job = launcher.preempt(_load(args), args.run)
    print(f"sent SIGUSR2 to job {job} of run {args.run}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    """Plan and launch the downstream fine-tunes of the sweep's completed runs (attach: in the file)."""
    from nepa_scale.launch import launcher  # heavy: torch, submitit
    from nepa_scale.workflows.attach import attached_sweep, export_sources  # heavy: torch

    sweep = _load(args)
    names = [args.name] if args.name else list(sweep.attach)
    if not names:
        return fail(f"sweep {sweep.name}: the file has no attach: section ({sweep.path})")
    code = 0
    for name in names:
        downstream = attached_sweep(sweep, name, executor=args.executor)
        for warning in downstream.warnings:
            print(f"warning: {warning}")
        if not args.dry_run:
            export_sources(downstream)
        pending = launcher.launch(downstream, retry_failed=args.retry_failed, dry_run=args.dry_run)
        verb = "would submit" if args.dry_run else "submitted"
        print(
            f"attach.{name}: {verb} {len(pending)} of {len(downstream.runs)} runs -> {downstream.output_root}"
        )
        recipe = f"attach.{name} ({sweep.path.parent / sweep.attach[name]['sweep']})"
        if _not_submitted(downstream, pending, downstream.path, recipe):
            code = 1
        if args.wait and not args.dry_run:
            launcher.wait(downstream)
            code = max(code, _print_status(downstream, downstream.path))
    return code


def _sweep_file_options(executors: tuple[str, ...]) -> argparse.ArgumentParser:
    """What every action takes: the file and what decides its runs."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("sweep", help="sweep file, e.g. sweeps/demo.yaml")
    common.add_argument("--executor", choices=executors, default=None, help="override the profile's executor")
    common.add_argument("--output-root", default=None, help="override the sweep's output_root")
    common.add_argument(
        "--set",
        nargs="+",
        action="extend",  # --set a=1 b=2 and --set a=1 --set b=2 alike
        default=[],
        metavar="KEY=VALUE",
        help="extra run config, e.g. data.root=/data/imagenet",
    )
    return common


def _submit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retry-failed", action="store_true", help="also resubmit failed runs")
    p.add_argument("--dry-run", action="store_true", help="only say what would be submitted")
    p.add_argument("--wait", action="store_true", help="wait until every run has ended")


def _advice_options(p: argparse.ArgumentParser, loop: bool) -> None:
    p.add_argument(
        "--budget-gpu-hours",
        type=float,
        required=not loop,
        default=None,
        help="GPU-hours (the planner's, on the sweep's profile) the advice may spend"
        + (" in all rounds" if loop else ""),
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="MODEL:KIND=VALUE",
        help="what to predict instead of the file's target:, e.g. nepa_h14:epochs=800 (KIND: images, epochs, flops)",
    )
    p.add_argument("--quantity", default="auto", help="fitted column (as `nepa-scale report`)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the law")
    p.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")


def add_commands(sub, executors: tuple[str, ...]) -> None:
    sweep = sub.add_parser("sweep", help="plan, launch, follow and cancel a sweep (sweeps/*.yaml)")
    actions = sweep.add_subparsers(dest="action", required=True)
    common = [_sweep_file_options(executors)]

    plan = actions.add_parser("plan", parents=common, help="each run's steps, memory, time and device-hours")
    plan.add_argument(
        "--against", default=None, help="compare the device-hours with another sweep file (same --set)"
    )
    plan.add_argument(
        "--comm", action="store_true", help="each run's collectives per step and its step time's parts"
    )
    plan.set_defaults(func=cmd_plan)

    launch = actions.add_parser(
        "launch", parents=common, help="submit the runs not done (a re-run continues)"
    )
    _submit_options(launch)
    launch.add_argument(
        "--advise",
        action="store_true",
        help="closed loop: launch, wait, refit and launch the advisor's runs until --until-interval or the budget",
    )
    _advice_options(launch, loop=True)
    launch.add_argument(
        "--until-interval",
        type=float,
        default=None,
        help="stop once every target's 95%% interval is narrower than this share of its prediction (e.g. 0.2)",
    )
    launch.add_argument("--rounds", type=int, default=3, help="rounds of advice the budget is shared over")
    launch.add_argument(
        "--submit",
        action="store_true",
        help="run the loop itself as a small CPU job of the profile's scheduler",
    )
    launch.set_defaults(func=cmd_launch)

    advise = actions.add_parser(
        "advise",
        parents=common,
        help="the runs that narrow the target's interval most per GPU-hour (a sweep file)",
    )
    _advice_options(advise, loop=False)
    advise.set_defaults(func=cmd_advise)

    status = actions.add_parser("status", parents=common, help="each run's state, progress and job")
    status.set_defaults(func=cmd_status)

    cancel = actions.add_parser("cancel", parents=common, help="cancel the sweep's jobs")
    cancel.set_defaults(func=cmd_cancel)

    preempt = actions.add_parser("preempt", parents=common, help="send one run's job a preemption notice")
    preempt.add_argument("--run", required=True, help="the run id")
    preempt.set_defaults(func=cmd_preempt)

    attach = actions.add_parser("attach", parents=common, help="launch the downstream fine-tunes of attach:")
    attach.add_argument("--name", default=None, help="one of the file's attach: entries (default: all)")
    _submit_options(attach)
    attach.set_defaults(func=cmd_attach)
