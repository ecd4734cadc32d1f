"""``nepa-scale sweep ACTION SWEEP_FILE``: plan, launch, status, cancel, preempt, attach, each with
only its own options (every action takes --executor, --output-root and --set: they decide the runs
and their ids)."""

from __future__ import annotations

import argparse
import logging

from nepa_scale.cli.errors import fail


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

    sweep = _load(args)
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
    launch.set_defaults(func=cmd_launch)

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
