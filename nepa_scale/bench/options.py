"""``nepa-scale bench``'s options (light: the CLI builds its parser without importing torch)."""

from __future__ import annotations

import argparse

from nepa_scale.bench.case import ENGINES
from nepa_scale.config import COMPILE_SCOPES, PRECISIONS
from nepa_scale.models.arch import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="nepa_tiny", help="comma-separated zoo entries")
    parser.add_argument("--batch", default="64", help="micro-batch: one value, or one per model")
    parser.add_argument("--attention", default="auto", help=f"comma-separated: {','.join(BACKENDS)}")
    parser.add_argument("--zero", default="2", help="comma-separated ZeRO stages")
    parser.add_argument("--compile", default="none", help=f"comma-separated: {','.join(COMPILE_SCOPES)}")
    parser.add_argument("--engine", default="deepspeed", help=f"comma-separated: {','.join(ENGINES)}")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--data", default="synthetic", help="synthetic | digits | an ImageNet-style folder")
    parser.add_argument("--decode", default="cpu", help="comma-separated, for a folder: cpu,device")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument(
        "--grad-checkpointing", default="false", help="false | true | N (first N blocks) | auto (what fits)"
    )
    parser.add_argument("--override", action="append", help="model.overrides key=value, e.g. image_size=32")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any run-config override for every case, e.g. deepspeed.overlap_comm=false",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="N: profile N more steps (device busy share, costliest kernels)",
    )
    parser.add_argument("--case-timeout", type=float, default=None, help="seconds per case")
    parser.add_argument("--out", default="bench.json", help="JSON report path")
