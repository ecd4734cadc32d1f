"""Study designs: WSD schedules, cooldown branches that equal standalone runs bitwise, IsoFLOP
grids, seeds, run ids that survive a data move, planning without the data.

Branches and standalone runs are real `nepa-scale train` processes (DeepSpeed ZeRO-2 on CPU);
the SLURM side (a trunk submitting its branches, job arrays) is in tests/test_launch.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import REPO, final_weights, losses, metrics, run_and_signal, run_train

from nepa_scale.config import OptimConfig, load_config
from nepa_scale.engine.checkpoint import committed_checkpoints
from nepa_scale.engine.schedule import cooldown_start, lr_factor

WSD = [
    "deepspeed.zero_stage=2",
    "optim.schedule=wsd",
    "optim.warmup_steps=5",
    "optim.cooldown_fraction=0.25",
    "checkpoint.every=100",
]


def test_wsd_schedule_shapes():
    optim = OptimConfig(schedule="wsd", warmup_steps=10, cooldown_fraction=0.2, cooldown_shape="linear")
    factor = lr_factor(optim, 100, peak_lr=1.0)
    assert [factor(s) for s in (0, 5, 10, 79, 80)] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert factor(90) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)
    sqrt = lr_factor(OptimConfig(schedule="wsd", warmup_steps=10, cooldown_fraction=0.2), 100, 1.0)
    assert sqrt(85) == pytest.approx(1 - math.sqrt(0.25))
    # Until its cooldown, a run's lr does not depend on its length: what lets budgets share a trunk.
    long = lr_factor(optim, 1000, 1.0)
    assert all(long(s) == factor(s) for s in range(cooldown_start(optim, 100) + 1))
    constant = lr_factor(OptimConfig(schedule="constant", warmup_steps=10), 100, 1.0)
    assert constant(99) == 1.0
    cosine = lr_factor(OptimConfig(warmup_fraction=0.1, min_lr=0.1), 100, 1.0)
    assert cosine(10) == 1.0 and cosine(100) == pytest.approx(0.1)


@pytest.mark.slow
def test_a_branch_equals_the_standalone_run_of_its_budget_bitwise(tmp_path):
    """Trunk of 60 steps; the 40-step budget's cooldown starts at step 30. The branch starts from
    the trunk's step-30 checkpoint, is preempted mid-cooldown and resumed, and must reproduce the
    standalone 40-step WSD run's losses and final weights exactly."""
    trunk, standalone, branch = tmp_path / "trunk", tmp_path / "standalone", tmp_path / "branch"
    done = run_train(
        trunk, *WSD, "budget.images=1920", "checkpoint.keep_steps=[30]", "checkpoint.keep_last=1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c.step for c in committed_checkpoints(trunk / "checkpoints")] == [30, 60]  # kept for good
    done = run_train(standalone, *WSD, "budget.images=1280")
    assert done.returncode == 0, done.stderr[-3000:]

    as_branch = [*WSD, "budget.images=1280", f"branch.parent={trunk}", "branch.step=30"]
    cut = run_and_signal(branch, *as_branch, at_step=34)
    assert cut.returncode == 75, cut.stderr[-3000:]
    info = json.loads((branch / "run.json").read_text())
    assert info["branch"]["step"] == 30 and info["branch"]["parent"] == str(trunk)
    assert 34 <= info["step"] < 40
    assert min(c.step for c in committed_checkpoints(branch / "checkpoints")) > 30  # its own, after 30
    done = run_train(branch, *as_branch)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((branch / "run.json").read_text())
    assert info["status"] == "completed" and info["restarts"][-1]["from_step"] > 30
    assert info["branch"]["step"] == 30  # a resume keeps where the branch came from

    ours, theirs = losses(branch), losses(standalone)
    assert sorted(ours) == list(range(1, 41)) and ours == theirs
    assert [m["lr"] for m in metrics(branch)] == [m["lr"] for m in metrics(standalone)]
    a, b = final_weights(branch), final_weights(standalone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_branch_must_start_at_its_cooldown(tmp_path):
    from nepa_scale.errors import ConfigError

    config = load_config(
        REPO / "configs" / "digits_tiny.yaml",
        [*WSD, "budget.global_batch=32", "budget.images=1280", f"branch.parent={tmp_path}", "branch.step=20"],
    )
    from nepa_scale.engine.trainer import Trainer

    config.output_dir = str(tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"branch.step: 20 is not this run's cooldown start \(step 30 of 40"
    ):
        Trainer(config)
