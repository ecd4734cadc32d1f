"""``nepa-scale``: thin subcommands over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nepa_scale.config import ConfigError, check_world, load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_tiny.yaml"


def _fail(message: str, code: int = 2) -> int:
    print(f"nepa-scale: error: {message}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    import os

    try:
        config = load_config(args.config, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        check_world(config, world_size)
    except ConfigError as exc:
        return _fail(str(exc))
    from nepa_scale.engine.checkpoint import CheckpointError
    from nepa_scale.engine.trainer import NonFiniteLoss, ResumeRefused, train

    try:
        result = train(config)
    except (CheckpointError, ResumeRefused, NonFiniteLoss, RuntimeError) as exc:
        return _fail(str(exc).splitlines()[0], code=1)
    return result.exit_code


def cmd_export(args: argparse.Namespace) -> int:
    from nepa_scale.engine.export import export_run

    try:
        written = export_run(args.run_dir, args.out)
    except (FileNotFoundError, ConfigError) as exc:
        return _fail(str(exc))
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the sweep demo lands: a short CPU pretraining of the tiny model on the bundled digits."""
    overrides = [f"output_dir={args.output_dir}", *args.overrides]
    args.config, args.overrides = str(DEMO_CONFIG), overrides
    code = cmd_train(args)
    if code == 0:
        from nepa_scale.rundir import RunDir

        run = RunDir(args.output_dir)
        metrics = run.read_metrics()
        train_lines = [m for m in metrics if m.get("kind") == "train"]
        evals = [m for m in metrics if m.get("kind") == "eval"]
        if train_lines:
            print(
                f"first loss {train_lines[0]['loss']:.4f} -> last loss {train_lines[-1]['loss']:.4f} "
                f"after {train_lines[-1]['step']} steps; held-out loss {evals[-1]['val_loss']:.4f}"
                if evals
                else ""
            )
        print(f"run directory: {run.root} (metrics.jsonl, run.json, checkpoints/)")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nepa-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="one pretraining run: nepa-scale train CONFIG.yaml [key=value ...]")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-3")
    train.set_defaults(func=cmd_train)

    export = sub.add_parser(
        "export", help="consolidated fp32 safetensors (ours + official layout) from a run"
    )
    export.add_argument("run_dir")
    export.add_argument("--out", default=None, help="output directory (default RUN_DIR/export)")
    export.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="the model zoo with parameter counts and FLOPs")
    models.set_defaults(func=cmd_models)

    demo = sub.add_parser("demo", help="short CPU pretraining of nepa_tiny on the bundled digits")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
