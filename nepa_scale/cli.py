"""``nepa-scale``: thin subcommands over the library.

The project's own errors (``nepa_scale.errors.NepaError``: config, data, checkpoint, layout, fit,
sweep) are printed as one line: exit code 2 when the command as given cannot run (``UsageError``:
a bad config value, a folder that is not there), 1 for the rest. Anything else (a bug,
a device out of memory) keeps its traceback; out of memory adds a hint.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from nepa_scale.config import load_config
from nepa_scale.data import check_input_paths
from nepa_scale.engine.settings import check_world
from nepa_scale.errors import NepaError, PeerLost, UsageError
from nepa_scale.rundir import REQUEUE_EXIT_CODE, RunDir

OUT_OF_MEMORY_HINT = (
    "nepa-scale: the device ran out of memory: lower budget.micro_batch (gradient accumulation keeps "
    "the global batch) or checkpoint activations with model.grad_checkpointing=auto"
)


def _one_line(exc: Exception) -> str:
    """The error's own line; for one re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0." and the worker's traceback), the worker's message."""
    lines = str(exc).splitlines()
    if lines and lines[0].startswith("Caught ") and "worker" in lines[0]:
        raised = re.compile(rf"^(?:[\w.]+\.)?{type(exc).__name__}: (.*)$")  # the traceback's last line
        messages = [m.group(1) for m in map(raised.match, lines[1:]) if m]
        if messages:
            return messages[-1]
    return lines[0] if lines else type(exc).__name__


def _fail(message: str, code: int = 2) -> int:
    print(f"nepa-scale: error: {message}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    check_input_paths(config)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    check_world(config, world_size)
    complete = RunDir(config.output_dir).already_complete(config)
    if complete is not None:  # said at once: without importing and starting the engine
        print(f"nepa-scale: {complete}", file=sys.stderr)
        return 0
    from nepa_scale.engine.trainer import train

    return train(config).exit_code


def cmd_export(args: argparse.Namespace) -> int:
    from nepa_scale.engine.export import export_run, exported_step

    written = export_run(args.run_dir, args.out)
    print(f"exported step {exported_step(written['ours'])} of {args.run_dir}:")
    for kind, path in written.items():
        print(f"{kind:>13}: {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:  # noqa: ARG001
    from nepa_scale.flops import CONVENTIONS, train_flops_per_image
    from nepa_scale.models.zoo import count_params, get_arch, list_models

    header = (
        f"{'model':<10} {'dim':>5} {'depth':>5} {'heads':>5} {'img':>4} {'patch':>5} {'params':>13} {'w/o patch emb':>13} "
        + " ".join(f"{'GFLOP/img ' + c:>22}" for c in CONVENTIONS)
    )
    print(header)
    for name in list_models():
        a = get_arch(name)
        p = count_params(a)
        flops = " ".join(f"{train_flops_per_image(a, c) / 1e9:>22.2f}" for c in CONVENTIONS)
        print(
            f"{name:<10} {a.dim:>5} {a.depth:>5} {a.num_heads:>5} {a.image_size:>4} {a.patch_size:>5} {p['total']:>13,} {p['without_patch_embed']:>13,} {flops}"
        )
    print("GFLOP/img: training FLOPs per image (3x forward); conventions in nepa_scale/flops.py")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """kNN + linear probe of a run's newest committed checkpoint (or its EMA weights)."""
    from nepa_scale.workflows.probe import probe_run

    record, out = probe_run(
        args.run_dir,
        weights="random_init" if args.random_init else ("ema" if args.ema else "online"),
        causal=not args.bidirectional,
        k=args.k,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        data_overrides=args.data,
    )
    print(
        f"step {record['step']} ({record['weights']} weights, {'causal' if record['causal'] else 'bidirectional'}): "
        f"linear probe {record['linear_acc']:.4f} (weight decay {record['linear_wd']:g}), kNN (k={record['k']}) "
        f"{record['knn_acc']:.4f}; trained on {record['n_train']}, scored on {record['n_test']} held-out images -> {out}"
    )
    return 0


def cmd_segment_eval(args: argparse.Namespace) -> int:
    """mIoU and per-class IoU of a segmentation run's newest committed checkpoint."""
    from nepa_scale.workflows.segment_eval import evaluate_run

    record, out = evaluate_run(args.run_dir, args.mode, args.stride, args.limit, args.data)
    print(
        f"step {record['step']}: mIoU {record['miou']:.4f}, pixel accuracy {record['pixel_acc']:.4f} on "
        f"{record['images']} val images ({record['mode']}, single scale) -> {out}"
    )
    return 0


def _settings(args: argparse.Namespace):
    from nepa_scale.scaling.report import StudySettings

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
        frontier_from=getattr(args, "frontier_from", None),
    )


def cmd_collect(args: argparse.Namespace) -> int:
    from nepa_scale.scaling.collect import collect, write_table

    table = collect(args.sweep_dir, budgets=args.budgets, window=args.window, convention=args.convention)
    paths = write_table(table, args.out or Path(args.sweep_dir) / "report")
    counts = table.drop_duplicates("run_id")["status"].value_counts().to_dict()
    print(
        f"{len(table)} rows from {table['run_id'].nunique()} runs ({counts}) -> {paths['parquet']}, {paths['csv']}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nepa_scale.scaling.report import build_report, describe

    report = build_report(args.sweep_dir, args.out, _settings(args))
    for line in report.summary:
        print(line)
    for name, fit in report.fits.items():
        if name not in ("quantities", "prediction check"):
            print(f"{name}: {describe(fit)}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"report: {report.paths['html']} (and {report.paths['markdown'].name})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nepa_scale.bench import run_bench

    return run_bench(args)


def cmd_resize_data(args: argparse.Namespace) -> int:
    """A copy of an image folder with every image's shorter side at most --short-side pixels."""
    from nepa_scale.data.resize import resize_dataset

    try:
        s = resize_dataset(args.source, args.destination, args.short_side, args.quality, args.workers)
    except ValueError as exc:  # the copy's own checks (source, destination, settings)
        return _fail(str(exc))
    ratio = s.bytes_out / s.bytes_in if s.bytes_in else 1.0
    print(
        f"{args.destination}: {s.resized} resized, {s.copied} copied as they were, "
        f"{len(s.unreadable)} unreadable (copied), {s.already_done} already done; "
        f"{s.bytes_out / 1e6:.1f} MB from {s.bytes_in / 1e6:.1f} MB ({100 * ratio:.0f}%) in {s.seconds:.1f} s"
    )
    for path in s.unreadable[:10]:
        print(f"unreadable: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The end-to-end mini scaling study (sweeps/demo.yaml): train, survive a preemption, fit, report."""
    from nepa_scale.workflows.demo import DEMO_SWEEP, TRANSFER_SWEEP, run_demo

    transfer = None if args.transfer_sweep == "none" else (args.transfer_sweep or TRANSFER_SWEEP)
    return run_demo(args.sweep or DEMO_SWEEP, args.executor, args.output_root, args.bootstrap, transfer)


def _attach(sweep, args: argparse.Namespace) -> int:
    """Plan and launch the downstream fine-tunes of the sweep's completed runs (attach: in the file)."""
    from nepa_scale.launch import launcher
    from nepa_scale.workflows.attach import attached_sweep, export_sources

    names = [args.name] if args.name else list(sweep.attach)
    if not names:
        return _fail(f"sweep {sweep.name}: the file has no attach: section ({sweep.path})")
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
        if args.wait and not args.dry_run:
            launcher.wait(downstream)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """plan | launch | status | cancel | preempt | attach for one sweep file."""
    import logging

    from nepa_scale.launch.sweep import load_sweep

    sweep = load_sweep(args.sweep, executor=args.executor, output_root=args.output_root, overrides=args.set)
    from nepa_scale.launch import launcher

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "plan":
        from nepa_scale.launch.plan import plan_run, plan_table

        against = None
        if args.against:
            against = load_sweep(args.against, executor=args.executor, overrides=args.set)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs -> {sweep.output_root}")
        plans = [plan_run(run) for run in sweep.runs]
        print(plan_table(sweep, against, comm=args.comm, plans=plans))
        return 1 if any(plan.error for plan in plans) else 0
    if args.action == "attach":
        return _attach(sweep, args)
    if args.action == "launch":
        pending = launcher.launch(sweep, retry_failed=args.retry_failed, dry_run=args.dry_run)
        verb = "would submit" if args.dry_run else "submitted"
        print(
            f"{verb} {len(pending)} of {len(sweep.runs)} runs"
            + (": " + ", ".join(r.run_id for r in pending) if pending else "")
        )
        submitted = {r.run_id for r in pending}
        left = [r for r in launcher.sweep_status(sweep) if r.run_id not in submitted]
        for line in launcher.not_done_lines(left, args.sweep):
            print(f"not submitted: {line}")
        invalid = sum(r.invalid for r in left)
        if invalid:  # a sweep file with a bad row is not a launch that went well
            print(f"{invalid} run(s) of {args.sweep} are invalid (`nepa-scale sweep plan` names the key)")
        if not args.wait or args.dry_run:
            return 1 if invalid else 0
        launcher.wait(sweep)
    if args.action == "preempt":
        if not args.run:
            return _fail("sweep preempt: --run RUN_ID is required")
        job = launcher.preempt(sweep, args.run)
        print(f"sent SIGUSR2 to job {job} of run {args.run}")
        return 0
    if args.action == "cancel":
        cancelled = launcher.cancel(sweep)
        print(f"cancelled {len(cancelled)} runs" + (": " + ", ".join(cancelled) if cancelled else ""))
        return 0
    rows = launcher.sweep_status(sweep)
    print(launcher.status_table(rows))
    for line in launcher.not_done_lines(rows, args.sweep):
        print(line)
    return 1 if any(r.state == "failed" for r in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nepa-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="one run (pretrain, finetune or segment): nepa-scale train CONFIG.yaml [key=value ...]"
    )
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser(
        "export", help="consolidated fp32 safetensors (ours + official layout) from a run"
    )
    export.add_argument("run_dir")
    export.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    export.set_defaults(func=cmd_export)

    probe = sub.add_parser("probe", help="kNN + linear probe of a run's newest checkpoint")
    probe.add_argument("run_dir")
    probe.add_argument(
        "--data", nargs="*", default=[], help="data overrides, e.g. kind=imagefolder root=/data/in1k"
    )
    probe.add_argument("--ema", action="store_true", help="probe the EMA weights")
    probe.add_argument("--random-init", action="store_true", help="probe the untrained model (the baseline)")
    probe.add_argument(
        "--bidirectional", action="store_true", help="bidirectional attention for the features"
    )
    probe.add_argument("--k", type=int, default=20)
    probe.add_argument(
        "--train-per-class",
        type=int,
        default=None,
        help="training images per class (default: the run's logging.probe_train_per_class)",
    )
    probe.add_argument(
        "--val-per-class",
        type=int,
        default=None,
        help="val images per class (default: the run's logging.probe_val_per_class)",
    )
    probe.set_defaults(func=cmd_probe)

    seg = sub.add_parser(
        "segment-eval", help="mIoU of a segmentation run's newest checkpoint on its val split"
    )
    seg.add_argument("run_dir")
    seg.add_argument(
        "--mode", choices=["slide", "whole"], default=None, help="default: the run's segment.eval_mode"
    )
    seg.add_argument("--stride", type=int, default=None, help="sliding-window stride (px)")
    seg.add_argument("--limit", type=int, default=None, help="the first N val images only")
    seg.add_argument(
        "--data", nargs="*", default=[], help="data overrides, e.g. root=/data/ADEChallengeData2016"
    )
    seg.set_defaults(func=cmd_segment_eval)

    models = sub.add_parser("models", help="the model zoo with parameter counts and FLOPs")
    models.set_defaults(func=cmd_models)

    bench = sub.add_parser(
        "bench",
        help="time the real training step per model x attention x ZeRO stage x compile x engine",
    )
    from nepa_scale.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    for name, func, text in (
        ("collect", cmd_collect, "the tidy run table (Parquet + CSV) of a sweep directory"),
        ("report", cmd_report, "fits, figures and an HTML/Markdown report of a sweep directory"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("sweep_dir")
        p.add_argument("--out", default=None, help="output directory (default SWEEP_DIR/report)")
        p.add_argument(
            "--budgets", type=float, nargs="*", default=None, help="pre-registered compute budgets (FLOPs)"
        )
        p.add_argument("--window", type=int, default=5, help="log lines averaged for the loss at a budget")
        p.add_argument("--convention", default="6N+attn", choices=["6N", "6N+attn", "6N+attn_causal"])
        p.add_argument(
            "--quantity",
            default="auto",
            help="fitted column (default auto: the online linear-probe error when every run has it, else the "
            "kNN error, else the held-out NEPA loss with a warning; ft_error / seg_error: the attached "
            "fine-tunes; or any positive column)",
        )
        p.add_argument(
            "--frontier-from",
            type=float,
            default=None,
            help="FLOPs where the frontier fit starts (default: where the frontier has covered 10%% of its drop)",
        )
        p.add_argument("--n", default="params", choices=["params", "params_no_embed"])
        p.add_argument("--d", default="images", choices=["images", "patches"])
        p.add_argument("--bootstrap", type=int, default=1000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--downstream", nargs="*", default=None, help="metric columns to plot and fit vs compute"
        )
        p.set_defaults(func=func)

    sweep = sub.add_parser("sweep", help="plan, launch, follow and cancel a sweep (sweeps/*.yaml)")
    sweep.add_argument("action", choices=["plan", "launch", "status", "cancel", "preempt", "attach"])
    sweep.add_argument("sweep", help="sweep file, e.g. sweeps/demo.yaml")
    sweep.add_argument(
        "--executor", choices=["slurm", "local"], default=None, help="override the profile's executor"
    )
    sweep.add_argument("--output-root", default=None, help="override the sweep's output_root")
    sweep.add_argument(
        "--set",
        nargs="+",
        action="extend",  # --set a=1 b=2 and --set a=1 --set b=2 alike
        default=[],
        metavar="KEY=VALUE",
        help="extra run config, e.g. data.root=/data/imagenet",
    )
    sweep.add_argument(
        "--against", default=None, help="plan: compare the device-hours with another sweep file (same --set)"
    )
    sweep.add_argument(
        "--comm", action="store_true", help="plan: each run's collectives per step and its step time's parts"
    )
    sweep.add_argument("--retry-failed", action="store_true", help="launch: also resubmit failed runs")
    sweep.add_argument("--dry-run", action="store_true", help="launch: only say what would be submitted")
    sweep.add_argument("--wait", action="store_true", help="launch: wait until every run has ended")
    sweep.add_argument("--run", default=None, help="preempt: the run id to send a preemption notice")
    sweep.add_argument(
        "--name", default=None, help="attach: one of the file's attach: entries (default: all)"
    )
    sweep.set_defaults(func=cmd_sweep)

    resize = sub.add_parser(
        "resize-data", help="a copy of an image folder with smaller images (a faster CPU loader)"
    )
    resize.add_argument("source", help="an ImageNet-style folder, e.g. imagenet/ (train/ and val/ inside)")
    resize.add_argument("destination", help="a new folder; an interrupted copy resumes")
    resize.add_argument(
        "--short-side", type=int, required=True, help="pixels, e.g. 256 (no default: it changes the data)"
    )
    resize.add_argument("--quality", type=int, default=90, help="JPEG quality of resized JPEGs")
    resize.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    resize.set_defaults(func=cmd_resize_data)

    demo = sub.add_parser("demo", help="end-to-end mini scaling study on this machine (sweeps/demo.yaml)")
    demo.add_argument("--executor", choices=["local", "slurm"], default=None, help="default: local processes")
    demo.add_argument("--output-root", default=None, help="default: the sweep's output_root (runs/demo)")
    demo.add_argument("--sweep", default=None, help="another sweep file (e.g. a smaller one)")
    demo.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the fit intervals")
    demo.add_argument(
        "--transfer-sweep",
        default=None,
        help="the fine-tune recipe of the transfer comparison (default sweeps/demo_transfer.yaml; none: skip it)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        return _fail(str(exc).splitlines()[0], code=2)
    except PeerLost as exc:  # resumable: the code a scheduler reads as "run me again"
        return _fail(_one_line(exc), code=REQUEUE_EXIT_CODE)
    except NepaError as exc:
        return _fail(_one_line(exc), code=1)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            print(OUT_OF_MEMORY_HINT, file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
