"""What DeepSpeed sends per training step, against what ``nepa_scale/comm.py`` predicts.

Run one process per rank (torchrun, srun, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set by hand):

    torchrun --nproc-per-node 2 benchmarks/comm_bytes.py --stages 1,2,3 --out comm.json [KEY=VALUE ...]

A stage may carry one more override of its own, ``3:KEY=VALUE`` (e.g. a small
``deepspeed.extra.zero_optimization.stage3_max_reuse_distance``, to see parameters gathered again
in backward).

For each ZeRO stage every rank builds the run exactly as ``nepa-scale train`` does (the trainer's
own model, optimizer and DeepSpeed engine, from configs/digits_tiny.yaml and the overrides) with
DeepSpeed's communication logger on, runs warm-up steps (ZeRO-3 records its parameter trace in the
first), then counts what the logger records over the measured steps: bytes and calls per step for
each collective. Rank 0 writes them beside the model's prediction; the exit code is 1 when any
collective's bytes differ from the prediction by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def logged() -> dict[str, tuple[int, float]]:
    """(calls, bytes) per collective recorded so far by DeepSpeed's communication logger."""
    from deepspeed.comm import comms_logger

    return {
        op: (sum(v[0] for v in sizes.values()), float(sum(size * v[0] for size, v in sizes.items())))
        for op, sizes in comms_logger.comms_dict.items()
    }


def measure_stage(config_path: Path, overrides: list[str], spec: str, warmup: int, steps: int) -> dict:
    """``spec``: a ZeRO stage, optionally ``STAGE:KEY=VALUE`` with an override for this stage only."""
    import deepspeed

    from nepa_scale.config import load_config
    from nepa_scale.engine.trainer import Trainer
    from nepa_scale.launch.plan import planned_collectives

    with tempfile.TemporaryDirectory() as tmp:
        logger = "deepspeed.extra.comms_logger={enabled: true, prof_all: true, verbose: false}"
        stage, _, own = spec.partition(":")
        extra = [own] if own else []
        config = load_config(
            config_path, [*overrides, f"output_dir={tmp}", f"deepspeed.zero_stage={stage}", logger, *extra]
        )
        trainer = Trainer(config)
        engine, _, _ = trainer.build_engine(resume=False)
        batches = trainer.batches(0)
        for step in range(warmup):
            trainer.train_step(engine, batches, step)
        before = logged()
        for step in range(warmup, warmup + steps):
            trainer.train_step(engine, batches, step)
        after = logged()
        world, settings = trainer.world, trainer.settings
        collectives, _ = planned_collectives(
            config, engine.module, world.world_size, settings, world.device.type
        )
        params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        del engine
    measured = {
        op: {
            "calls": (calls - before.get(op, (0, 0))[0]) / steps,
            "bytes": (size - before.get(op, (0, 0))[1]) / steps,
        }
        for op, (calls, size) in after.items()
    }
    predicted: dict[str, dict[str, float]] = {}
    for c in collectives:
        entry = predicted.setdefault(c.op, {"calls": 0, "bytes": 0.0})
        entry["calls"] += c.calls
        entry["bytes"] += c.logged_bytes
    return {
        "zero_stage": int(stage),
        "stage_override": own or None,
        "world_size": world.world_size,
        "micro_batch": settings.micro_batch,
        "accumulation_steps": settings.accumulation_steps,
        "precision": settings.precision,
        "params": params,
        "deepspeed": deepspeed.__version__,
        "measured_per_step": {op: v for op, v in measured.items() if v["calls"] or v["bytes"]},
        "predicted_per_step": predicted,
    }


def label(result: dict) -> str:
    return f"ZeRO-{result['zero_stage']}" + (
        f" ({result['stage_override']})" if result["stage_override"] else ""
    )


SCALARS_BYTES = 1024  # per step: DeepSpeed's scalar agreements (gradient norm, overflow), not modelled


def disagreements(result: dict, tolerance: float) -> list[str]:
    """Collectives whose measured bytes per step are off the prediction by more than ``tolerance``
    (relative), either way; a collective on only one side counts unless it moves under
    ``SCALARS_BYTES`` per step."""
    measured, predicted = result["measured_per_step"], result["predicted_per_step"]
    out = []
    for op in sorted(set(measured) | set(predicted)):
        got, want = measured.get(op, {}).get("bytes", 0.0), predicted.get(op, {}).get("bytes", 0.0)
        if want == 0 and got < SCALARS_BYTES:
            continue
        if abs(got - want) > tolerance * max(want, 1.0):
            out.append(f"{label(result)} {op}: measured {got:,.0f} B/step, predicted {want:,.0f}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "digits_tiny.yaml"))
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--out", default="comm_bytes.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    results = [
        measure_stage(Path(args.config), args.overrides, spec, args.warmup, args.steps)
        for spec in args.stages.split(",")
    ]
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    problems = [line for result in results for line in disagreements(result, args.tolerance)]
    Path(args.out).write_text(
        json.dumps({"tolerance": args.tolerance, "results": results, "problems": problems}, indent=1)
    )
    for result in results:
        for op, want in sorted(result["predicted_per_step"].items()):
            got = result["measured_per_step"].get(op, {"bytes": 0.0, "calls": 0})
            print(
                f"{label(result)} {op:<22} measured {got['bytes']:>12,.0f} B in {got['calls']:>5.1f} calls"
                f"  predicted {want['bytes']:>12,.0f} B in {want['calls']:>5} calls"
            )
    print("\n".join(problems) or f"every collective within {100 * args.tolerance:.0f}% of the prediction")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
