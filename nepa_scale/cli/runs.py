"""The commands on one run: train, export, probe, segment-eval; and the zoo, the benchmark and the
data copy that runs are made from."""

from __future__ import annotations

import argparse
import os
import sys

from nepa_scale.bench.options import add_arguments as add_bench_arguments
from nepa_scale.cli.errors import fail
from nepa_scale.config import SEGMENT_EVAL_MODES, load_config
from nepa_scale.config.files import check_output_folder
from nepa_scale.data import check_input_paths
from nepa_scale.engine.fingerprint import already_complete
from nepa_scale.engine.settings import check_loggers, check_world
from nepa_scale.flops import CONVENTIONS, train_flops_per_image
from nepa_scale.models.zoo import count_params, get_arch, list_models
from nepa_scale.ownership import claim
from nepa_scale.rundir import RunDir


def rank_from_env() -> int:
    """This process's rank as torchrun or srun set it (0 for a single process), before any engine."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0"))


def cmd_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    check_input_paths(config)
    check_output_folder(config.output_dir, "output_dir")
    check_loggers(config.logging)
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    check_world(config, world_size)
    # The run's lock first (rank 0), before anything is read as the run's state or written: a second
    # writer on this output_dir is refused at once, without importing and starting the engine.
    owner = claim(config.output_dir, "train", rank_from_env())
    if owner.refusal is not None and world_size == 1:
        raise owner.refusal
    try:
        complete = already_complete(RunDir(config.output_dir), config)
        if complete is not None:  # said at once: without importing and starting the engine
            print(f"nepa-scale: {complete}", file=sys.stderr)
            return 0
        from nepa_scale.engine.trainer import train  # heavy (torch, DeepSpeed): only for a run to train

        return train(config, owner=owner).exit_code
    finally:
        owner.release()


def cmd_export(args: argparse.Namespace) -> int:
    from nepa_scale.engine.export import export_run, exported_step  # heavy: torch, DeepSpeed

    written = export_run(args.run_dir, args.out)
    print(f"exported step {exported_step(written['ours'])} of {args.run_dir}:")
    for kind, path in written.items():
        print(f"{kind:>13}: {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:  # noqa: ARG001
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
    from nepa_scale.workflows.probe import probe_run  # heavy: torch, scikit-learn

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
    from nepa_scale.workflows.segment_eval import evaluate_run  # heavy: torch

    record, out = evaluate_run(args.run_dir, args.mode, args.stride, args.limit, args.data)
    print(
        f"step {record['step']}: mIoU {record['miou']:.4f}, pixel accuracy {record['pixel_acc']:.4f} on "
        f"{record['images']} val images ({record['mode']}, single scale) -> {out}"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nepa_scale.bench.runner import run_bench  # heavy: torch, DeepSpeed

    return run_bench(args)


def cmd_resize_data(args: argparse.Namespace) -> int:
    """A copy of an image folder with every image's shorter side at most --short-side pixels."""
    from nepa_scale.data.resize import resize_dataset  # heavy: torch (through data/)

    try:
        s = resize_dataset(args.source, args.destination, args.short_side, args.quality, args.workers)
    except ValueError as exc:  # the copy's own checks (source, destination, settings)
        return fail(str(exc))
    ratio = s.bytes_out / s.bytes_in if s.bytes_in else 1.0
    print(
        f"{args.destination}: {s.resized} resized, {s.copied} copied as they were, "
        f"{len(s.unreadable)} unreadable (copied), {s.already_done} already done; "
        f"{s.bytes_out / 1e6:.1f} MB from {s.bytes_in / 1e6:.1f} MB ({100 * ratio:.0f}%) in {s.seconds:.1f} s"
    )
    for path in s.unreadable[:10]:
        print(f"unreadable: {path}")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """An image folder packed into shards read by random access (data.kind=shards), resized on the way
    when --short-side is given."""
    from nepa_scale.data.prepare import prepare_data  # heavy: torch (through data/)

    try:
        s = prepare_data(
            args.source,
            args.destination,
            args.short_side,
            args.quality,
            args.samples_per_shard,
            args.workers,
            tuple(args.splits),
        )
    except ValueError as exc:  # the source, the destination, the settings
        return fail(str(exc))
    ratio = s.bytes_out / s.bytes_in if s.bytes_in else 1.0
    print(
        f"{args.destination}: {s.samples} samples in {s.shards} shards ({s.already_done} packed before), "
        f"{s.resized} resized, {len(s.unreadable)} unreadable (skipped); {s.bytes_out / 1e6:.1f} MB from "
        f"{s.bytes_in / 1e6:.1f} MB read ({100 * ratio:.0f}%) in {s.seconds:.1f} s; train with "
        f"data.kind=shards data.root={args.destination}"
    )
    for path, reason in s.unreadable[:10]:
        print(f"unreadable (skipped): {path}: {reason}")
    if len(s.unreadable) > 10:
        print(f"... and {len(s.unreadable) - 10} more (nepa_shards.json in the destination lists them all)")
    return 0


def add_commands(sub) -> None:
    """train, export, probe, segment-eval, models, bench, resize-data, prepare-data."""
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
    for split in ("train", "val"):
        probe.add_argument(
            f"--{split}-per-class",
            type=int,
            default=None,
            help=f"{split} images per class (default: the run's logging.probe_{split}_per_class)",
        )
    probe.set_defaults(func=cmd_probe)

    seg = sub.add_parser(
        "segment-eval", help="mIoU of a segmentation run's newest checkpoint on its val split"
    )
    seg.add_argument("run_dir")
    seg.add_argument(
        "--mode", choices=SEGMENT_EVAL_MODES, default=None, help="default: the run's segment.eval_mode"
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
        "bench", help="time the real training step per model x attention x ZeRO stage x compile x engine"
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

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

    prepare = sub.add_parser(
        "prepare-data",
        help="pack an image folder into shards read by random access (data.kind=shards): for a cluster",
    )
    prepare.add_argument("source", help="an ImageNet-style folder, e.g. imagenet/ (train/ and val/ inside)")
    prepare.add_argument("destination", help="a new folder; an interrupted packing resumes")
    prepare.add_argument(
        "--short-side", type=int, default=None, help="resize as resize-data does, e.g. 256 (default: keep)"
    )
    prepare.add_argument("--quality", type=int, default=90, help="JPEG quality of resized JPEGs")
    prepare.add_argument("--samples-per-shard", type=int, default=5000, help="samples in each tar shard")
    prepare.add_argument("--splits", nargs="+", default=["train", "val"], help="the split folders to pack")
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    prepare.set_defaults(func=cmd_prepare_data)
