"""The commands on a study: collect, report, and the end-to-end demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from nepa_scale.config.files import check_output_folder
from nepa_scale.errors import FitError, UsageError
from nepa_scale.flops import CONVENTIONS
from nepa_scale.launch.targets import parse_target_option
from nepa_scale.scaling import D_KINDS, N_KINDS


def _settings(args: argparse.Namespace):
    from nepa_scale.scaling.study import StudySettings  # heavy: pandas, matplotlib

    return StudySettings(
        quantity=args.quantity,
        n_kind=args.n,
        d_kind=args.d,
        convention=args.convention,
        budgets=args.budgets,
        window=args.window,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        downstream=args.downstream or [],
        frontier_from=args.frontier_from,
    )


def cmd_collect(args: argparse.Namespace) -> int:
    from nepa_scale.scaling.collect import collect, unreadable_line_warnings, write_table  # heavy: pandas
    from nepa_scale.scaling.comparable import incomparable_runs  # heavy, likewise

    out = args.out or Path(args.sweep_dir) / "report"
    check_output_folder(out, "--out")
    table = collect(args.sweep_dir, budgets=args.budgets, window=args.window, convention=args.convention)
    paths = write_table(table, out)
    counts = table.drop_duplicates("run_id")["status"].value_counts().to_dict()
    print(
        f"{len(table)} rows from {table['run_id'].nunique()} runs ({counts}) -> {paths['parquet']}, {paths['csv']}"
    )
    warnings = unreadable_line_warnings(table)
    try:
        warnings += incomparable_runs(table)[1]
    except FitError as exc:  # runs split evenly between data sets: what report would refuse
        warnings.append(str(exc))
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def _targets(args: argparse.Namespace):
    """``--target`` resolved with the study's sweep file (``--sweep``, else the one study.json names)."""
    from nepa_scale.launch.advice import resolve_targets  # heavy: torch (the planner)
    from nepa_scale.launch.sweep import load_sweep  # heavy, likewise
    from nepa_scale.scaling.target import STUDY_RECORD, read_study_record  # heavy: pandas

    sweep_file = args.sweep or read_study_record(Path(args.sweep_dir)).get("sweep")
    if not sweep_file:
        raise UsageError(
            f"--target: {Path(args.sweep_dir) / STUDY_RECORD} does not name the study's sweep file (written by "
            "`nepa-scale sweep launch`): pass --sweep FILE"
        )
    sweep = load_sweep(sweep_file, output_root=args.sweep_dir)
    return resolve_targets(sweep, [parse_target_option(t) for t in args.target], record=False)


def cmd_report(args: argparse.Namespace) -> int:
    from nepa_scale.scaling.report import build_report, describe  # heavy: pandas, scipy, matplotlib

    settings = _settings(args)
    if args.target:
        settings.targets = _targets(args)
    report = build_report(args.sweep_dir, args.out, settings)
    for line in report.summary:
        print(line)
    for name, fit in report.fits.items():
        if name not in ("quantities", "prediction check"):
            print(f"{name}: {describe(fit)}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"report: {report.paths['html']} (and {report.paths['markdown'].name})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end mini scaling study (sweeps/demo.yaml): train, survive a preemption, fit, report."""
    from nepa_scale.workflows.demo import DEMO_SWEEP, TRANSFER_SWEEP, run_demo  # heavy: everything

    transfer = None if args.transfer_sweep == "none" else (args.transfer_sweep or TRANSFER_SWEEP)
    return run_demo(args.sweep or DEMO_SWEEP, args.executor, args.output_root, args.bootstrap, transfer)


def _add_study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output directory (default SWEEP_DIR/report)")
    p.add_argument(
        "--budgets", type=float, nargs="*", default=None, help="pre-registered compute budgets (FLOPs)"
    )
    p.add_argument("--window", type=int, default=5, help="log lines averaged for the loss at a budget")
    p.add_argument("--convention", default="6N+attn", choices=CONVENTIONS)
    p.add_argument(
        "--quantity",
        default="auto",
        help="fitted column (default auto: the online linear-probe error when most runs have it, else the "
        "kNN error, else the held-out NEPA loss with a warning; the runs without it are named and left "
        "out; ft_error / seg_error: the attached fine-tunes; or any positive column)",
    )
    p.add_argument(
        "--frontier-from",
        type=float,
        default=None,
        help="FLOPs where the frontier fit starts (default: where the frontier has covered 10%% of its drop)",
    )
    p.add_argument("--n", default="params", choices=list(N_KINDS))
    p.add_argument("--d", default="images", choices=list(D_KINDS))
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--downstream", nargs="*", default=None, help="metric columns to plot and fit vs compute")


def add_commands(sub, executors: tuple[str, ...]) -> None:
    """collect, report, demo."""
    for name, func, text in (
        ("collect", cmd_collect, "the tidy run table (Parquet + CSV) of a sweep directory"),
        ("report", cmd_report, "fits, figures and an HTML/Markdown report of a sweep directory"),
    ):
        p = sub.add_parser(name, help=text)
        _add_study_options(p)
        p.set_defaults(func=func)
        if name == "report":
            p.add_argument(
                "--target",
                action="append",
                default=[],
                metavar="MODEL:KIND=VALUE",
                help="predict this instead of the sweep file's target: (e.g. nepa_h14:epochs=800; KIND: images, "
                "epochs, flops), with the study's recipe and profile",
            )
            p.add_argument(
                "--sweep", default=None, help="the study's sweep file (default: the one study.json names)"
            )

    demo = sub.add_parser("demo", help="end-to-end mini scaling study on this machine (sweeps/demo.yaml)")
    demo.add_argument("--executor", choices=executors, default=None, help="default: local processes")
    demo.add_argument("--output-root", default=None, help="default: the sweep's output_root (runs/demo)")
    demo.add_argument("--sweep", default=None, help="another sweep file (e.g. a smaller one)")
    demo.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the fit intervals")
    demo.add_argument(
        "--transfer-sweep",
        default=None,
        help="the fine-tune recipe of the transfer comparison (default sweeps/demo_transfer.yaml; none: skip it)",
    )
    demo.set_defaults(func=cmd_demo)
