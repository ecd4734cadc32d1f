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
import yaml
from helpers import REPO, final_weights, losses, metrics, run_and_signal, run_train

from nepa_scale.config import OptimConfig, load_config
from nepa_scale.engine.checkpoint_store import committed_checkpoints
from nepa_scale.engine.schedule import cooldown_start, lr_factor
from nepa_scale.launch.design import training_flops, training_steps
from nepa_scale.launch.plan import plan_table
from nepa_scale.launch.sweep import load_sweep

WSD = [
    "deepspeed.zero_stage=2",
    "logging.log_every=3",  # the preemption cuts a log interval: the resumed mean covers it whole
    "optim.schedule=wsd",
    "optim.warmup_steps=5",
    "optim.cooldown_fraction=0.25",
    "checkpoint.every=100",
]
PROBES = [
    "logging.eval_every=10",
    "logging.probe_every=10",
    "logging.probe_train_per_class=20",
    "logging.probe_val_per_class=10",
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
    the trunk's step-30 checkpoint, is preempted mid-cooldown (and mid log interval) and resumed,
    and must reproduce the standalone 40-step WSD run's losses, lr, evaluation lines (held-out loss,
    diagnostics, probes on the same fixed subsets) and final weights exactly. This is also the
    suite's single-process ZeRO-2 exact-resume check."""
    trunk, standalone, branch = tmp_path / "trunk", tmp_path / "standalone", tmp_path / "branch"
    done = run_train(
        trunk, *WSD, *PROBES, "budget.images=1920", "checkpoint.keep_steps=[30]", "checkpoint.keep_last=1"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c.step for c in committed_checkpoints(trunk / "checkpoints")] == [30, 60]  # kept for good
    done = run_train(standalone, *WSD, *PROBES, "budget.images=1280")
    assert done.returncode == 0, done.stderr[-3000:]

    as_branch = [*WSD, *PROBES, "budget.images=1280", f"branch.parent={trunk}", "branch.step=30"]
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
    assert sorted(ours) == [*range(3, 40, 3), 40] and ours == theirs
    assert [m["lr"] for m in metrics(branch)] == [m["lr"] for m in metrics(standalone)]
    a, b = final_weights(branch), final_weights(standalone)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Evaluation: the branch's own points after step 30 (its cooled-down weights, not the trunk's),
    # the trunk's before, on the probe subsets the resume kept.
    def evals(run: Path) -> dict[int, dict]:
        return {m["step"]: {k: v for k, v in m.items() if k != "time"} for m in metrics(run, "eval")}

    ours, theirs, trunk_evals = evals(branch), evals(standalone), evals(trunk)
    assert sorted(ours) == [0, 10, 20, 30, 40] and ours == theirs
    assert all(ours[s] == trunk_evals[s] for s in (0, 10, 20, 30))
    assert ours[40]["probe_linear_nll"] != trunk_evals[40]["probe_linear_nll"]
    assert ours[40]["val_loss"] != trunk_evals[40]["val_loss"]
    recorded = [
        json.loads((run / "run.json").read_text())["probe_subsets"] for run in (trunk, standalone, branch)
    ]
    assert recorded[0] == recorded[1] == recorded[2] and recorded[0]["train"]["images"] == 200


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


# ----------------------------------------------------------------------------- planning


def write_sweep(tmp_path: Path, axes: list, **set_values) -> Path:
    spec = {
        "name": "study",
        "base": str(REPO / "configs" / "digits_tiny.yaml"),
        "set": {"model.overrides.depth": 2, **set_values},
        "axes": axes,
        "profile": "cpu",
        "output_root": str(tmp_path / "runs"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


MODELS = {"model.overrides.dim": [32, 64, 128], "model.overrides.num_heads": [2, 4, 8]}


def test_isoflop_runs_hit_their_compute_budget_within_one_percent(tmp_path):
    budgets = [3e12, 1e13]
    sweep = load_sweep(write_sweep(tmp_path, [{"isoflop": {"compute": budgets, "models": MODELS}}]))
    assert len(sweep.runs) == 6 and not any(run.error for run in sweep.runs)
    for run in sweep.runs:
        target = run.values["budget.flops"]
        assert run.config.budget.images is None and target in budgets
        assert abs(training_flops(run.config) / target - 1) <= 0.01
    steps = {run.run_id: training_steps(run.config) for run in sweep.runs}
    small, large = sweep.runs[0], sweep.runs[2]  # the same budget: the larger model trains fewer steps
    assert steps[small.run_id] > 3 * steps[large.run_id]
    table = plan_table(sweep)
    assert "C FLOPs" in table and "N params" in table and "D images" in table and "% of budget 3e+12" in table
    # A budget too small for whole steps to land within 1% is refused, naming the key.
    tiny = load_sweep(write_sweep(tmp_path, [{"isoflop": {"compute": [2e10], "models": MODELS}}]))
    assert all(run.error and run.error.startswith("budget.flops:") for run in tiny.runs[1:])


def test_seeds_give_distinct_ids_and_share_everything_else(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, [{"seeds": 3}]))
    assert len({run.run_id for run in sweep.runs}) == 3
    assert [run.config.seed for run in sweep.runs] == [0, 1, 2]
    configs = [{**run.config_data, "seed": None, "output_dir": None} for run in sweep.runs]
    assert configs[0] == configs[1] == configs[2]


def test_wsd_budgets_plan_as_one_trunk_and_branches_with_a_fixed_warmup(tmp_path):
    axes = [{"grid": {"budget.images": [12800, 25600, 51200]}}]
    sweep = load_sweep(write_sweep(tmp_path, axes, **{"optim.schedule": "wsd", "optim.warmup_steps": 10}))
    short, mid, trunk = sweep.runs
    assert trunk.trunk_of == (short.run_id, mid.run_id) and trunk.config.checkpoint.keep_steps == [80, 160]
    assert (short.parent, short.branch_step, mid.branch_step) == (trunk.run_id, 80, 160)
    assert short.config.branch.parent == str(trunk.run_dir)
    # Branching does not rename runs: a branch has the id of the standalone run of its budget.
    alone = load_sweep(
        write_sweep(
            tmp_path,
            [{"grid": {"budget.images": [12800]}}],
            **{"optim.schedule": "wsd", "optim.warmup_steps": 10},
        )
    )
    assert alone.runs[0].run_id == short.run_id and alone.runs[0].parent is None
    table = plan_table(sweep)
    assert "branch@80" in table and "trunk" in table and "this design saves" in table
    # A warmup in fractions gives each budget its own: they cannot share a trunk.
    fractions = load_sweep(write_sweep(tmp_path, axes, **{"optim.schedule": "wsd"}))
    assert all(run.error.startswith("optim.warmup_steps: runs") for run in fractions.runs)


def test_planning_without_the_data_plans_costs_and_warns_once(capsys):
    from nepa_scale.cli import main

    assert (
        main(["sweep", "plan", str(REPO / "sweeps" / "scaling_imagenet.yaml"), "--set", "data.root=/nowhere"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("warning: data.root: no shards at /nowhere/train (no samples.npz)") == 1
    assert "INVALID" not in out and "16 runs (0 invalid)" in out


def test_the_branched_imagenet_study_saves_gpu_hours():
    from nepa_scale.cli import main

    wsd = load_sweep(REPO / "sweeps" / "scaling_imagenet_wsd.yaml")
    trunks = [run for run in wsd.runs if run.trunk_of]
    assert len(trunks) == 8 and all(len(run.trunk_of) == 3 for run in trunks)  # S, B x 3 seeds; L; H
    assert {run.config.model.name for run in wsd.runs} == {"nepa_s14", "nepa_b14", "nepa_l14", "nepa_h14"}
    table = plan_table(wsd, load_sweep(REPO / "sweeps" / "scaling_imagenet.yaml"))
    (against,) = [line for line in table.splitlines() if line.startswith("against ")]
    assert "this design saves" in against
    assert main(["sweep", "plan", str(REPO / "sweeps" / "scaling_imagenet_wsd.yaml")]) == 0


def test_the_imagenet_sweeps_spend_under_two_percent_of_each_run_on_evaluation(tmp_path):
    """The shipped ImageNet studies probe online at every evaluation point; `sweep plan` prices it
    (forward passes over the probe subsets and the held-out batches) against each run's own
    training, here on an ImageNet-shaped folder of 1,000 classes (read as a folder: the studies'
    shards would need their samples' list to count the probe's images)."""
    from nepa_scale.launch.plan import plan_run

    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for i in range(1000):
            (root / split / f"n{i:08d}").mkdir(parents=True)
    for name in ("scaling_imagenet.yaml", "scaling_imagenet_wsd.yaml"):
        sweep = load_sweep(REPO / "sweeps" / name, overrides=[f"data.root={root}", "data.kind=imagefolder"])
        assert all(run.config.logging.probe_every for run in sweep.runs)
        plans = [plan_run(run) for run in sweep.runs]
        shares = [p.eval_share for p in plans]
        assert all(share is not None and 0 < share < 0.02 for share in shares), (name, max(shares))
        # A trunk evaluates every 2000 steps; its 10-epoch branch only at its own end.
        assert max(shares) > 0.001
    folder = [f"data.root={root}", "data.kind=imagefolder"]
    table = plan_table(load_sweep(REPO / "sweeps" / "scaling_imagenet.yaml", overrides=folder))
    assert "eval%" in table and "the probe's feature extraction" in table
