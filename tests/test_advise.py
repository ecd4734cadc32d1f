"""A study's target and its advisor: the law fitted in batches, the target's predictive interval,
the criterion's choices, and the sweep files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import DIGITS_CONFIG, env
from scipy.optimize import least_squares

from nepa_scale.errors import ConfigError, FitError
from nepa_scale.launch.sweep import load_sweep
from nepa_scale.launch.targets import parse_target_option, parse_targets
from nepa_scale.rundir import RunDir
from nepa_scale.scaling.advise import advise, set_cost
from nepa_scale.scaling.laws import CHINCHILLA, bootstrap_weights, fit_law, levenberg_marquardt
from nepa_scale.scaling.target import Target, predict_targets

LAW = {"E": 0.05, "A": 30.0, "alpha": 0.45, "B": 80.0, "beta": 0.4}


def law(n, d, p=LAW):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def synthetic_study(rng, widths, budgets, seeds=2, noise=0.13, p=LAW) -> pd.DataFrame:
    """Final points of a study whose quantity follows ``law`` with log-normal seed noise."""
    rows = [
        {
            "N": n,
            "D": d,
            "seed": s,
            "run_id": f"n{n:g}-d{d:g}-s{s}",
            "quantity": law(n, d, p) * np.exp(rng.normal(0, noise)),
        }
        for n in widths
        for d in budgets
        for s in range(seeds)
    ]
    return pd.DataFrame(rows)


def test_the_batched_fit_reaches_the_least_squares_optimum_of_every_resample():
    """Each bootstrap resample's fit is the optimum scipy's least_squares finds from the whole
    starting grid (the floor E switched on in the restarts is what makes this hold)."""
    rng = np.random.default_rng(0)
    pts = synthetic_study(rng, [7e3, 2.7e4, 1e5, 4e5], [2e4, 4e4, 8e4, 1.6e5])
    x, log_q = pts[["N", "D"]].to_numpy(), np.log(pts["quantity"].to_numpy())
    fit = fit_law(CHINCHILLA, x, pts["quantity"], pts["run_id"], pts["seed"], n_bootstrap=12, seed=3)
    weights = bootstrap_weights(pts["run_id"].to_numpy(), pts["seed"].to_numpy(), 12, 3)
    ours = ((CHINCHILLA.log_predict(fit.samples, x) - log_q) ** 2 * weights).sum(axis=1)
    starts = CHINCHILLA.starts(x, log_q)[::450]
    for b in range(0, 12, 3):
        w = np.sqrt(weights[b])
        best = min(
            (
                least_squares(
                    lambda th: w * (CHINCHILLA.log_predict(th[None], x)[0] - log_q),  # noqa: B023
                    s,
                    bounds=(CHINCHILLA.lower, CHINCHILLA.upper),
                )
                for s in [fit.theta, *starts]
            ),
            key=lambda r: r.cost,
        )
        assert ours[b] <= 2 * best.cost + 1e-8, b


def test_levenberg_marquardt_keeps_every_row_within_the_bounds():
    rng = np.random.default_rng(1)
    pts = synthetic_study(rng, [1e4, 3e4], [2e4, 4e4, 8e4], seeds=1)  # two widths: alpha runs to a bound
    x, log_q = pts[["N", "D"]].to_numpy(), np.log(pts["quantity"].to_numpy())
    starts = CHINCHILLA.starts(x, log_q)[::100]
    theta, cost = levenberg_marquardt(CHINCHILLA, starts, x, log_q, np.ones((len(starts), len(log_q))))
    assert np.all(np.isfinite(cost)) and np.all(theta[:, 3:] >= 0) and np.all(theta[:, 3:] <= 5)


def test_the_targets_95_percent_interval_covers_a_new_run_at_the_target():
    """The suite's version of benchmarks/advise_simulated.py's coverage check: studies of 4 widths x
    4 budgets x 2 seeds with a known law and the demo's seed noise (std of log 0.13), each with its
    own true parameters; a new run at a 4x larger model trained 2x longer falls inside the 95%
    predictive interval in 90-98% of the studies (and the law's own value in more)."""
    rng = np.random.default_rng(7)
    widths, budgets = [7.5e3, 2.7e4, 1e5, 4e5], [2e4, 4e4, 8e4, 1.6e5]
    target = Target("4x N, 2x D", 1.6e6, 3.2e5)
    inside = law_inside = 0
    draws = 100
    for i in range(draws):
        p = {
            "E": rng.uniform(0.02, 0.1), "A": rng.uniform(5, 50), "alpha": rng.uniform(0.3, 0.6),
            "B": rng.uniform(20, 200), "beta": rng.uniform(0.3, 0.6),
        }  # fmt: skip
        study = synthetic_study(rng, widths, budgets, p=p)
        truth = law(target.n, target.d, p)
        observed = truth * np.exp(rng.normal(0, 0.13))
        (pred,) = predict_targets(study, [target], n_bootstrap=100, seed=i).predictions
        inside += pred.low <= observed <= pred.high
        law_inside += pred.low <= truth <= pred.high
    assert 0.90 <= inside / draws <= 0.98, inside / draws
    assert law_inside >= inside


def test_a_target_two_widths_cannot_reach_is_flagged_not_usable():
    rng = np.random.default_rng(2)
    pts = synthetic_study(rng, [1e4, 3e4], [2e4, 4e4, 8e4, 1.6e5])
    (pred,) = predict_targets(pts, [Target("big", 3e5, 3.2e5)], n_bootstrap=100, trivial=0.9).predictions
    assert not pred.usable
    assert any(
        "2 model sizes below the target: the N exponent alpha is not pinned" in r for r in pred.reasons
    )
    assert "Not usable: " in pred.line("error")


def two_width_pool(costs) -> tuple[pd.DataFrame, pd.DataFrame, list[Target]]:
    rng = np.random.default_rng(0)
    budgets = [2e4, 4e4, 8e4, 1.6e5]
    pts = synthetic_study(rng, [1e4, 3e4], budgets)
    rows = [
        {
            "candidate": f"seed2 N{n:g} D{d:g}",
            "N": n,
            "D": d,
            "cost": costs(n, d),
            "group": f"{n:g}|2",
            "kind": "seed",
        }
        for n in (1e4, 3e4)
        for d in budgets
    ]
    rows += [
        {
            "candidate": f"new N1e5 D{d:g}",
            "N": 1e5,
            "D": d,
            "cost": costs(1e5, d),
            "group": "1e5|0",
            "kind": "width",
        }
        for d in budgets
    ]
    pool = pd.DataFrame(rows)
    pool["branch_cost"] = 0.2 * pool["cost"]
    return pts, pool, [Target("N = 3e5", 3e5, 3.2e5)]


def test_the_advisor_prefers_a_new_width_to_more_seeds_of_two_widths():
    """With two widths the N exponent is not pinned: for a larger target, a third width is worth
    more than more seeds of the two, run for run (equal costs: the first choice is the new width)
    and per GPU-hour (costs in N x D: most of the budget goes to it)."""
    pts, pool, targets = two_width_pool(lambda n, d: 1.0)
    first = advise(pts, pool, targets, budget=1.0, n_bootstrap=300).chosen
    assert list(first["kind"]) == ["width"]
    pts, pool, targets = two_width_pool(lambda n, d: n * d / 1e9)
    advice = advise(pts, pool, targets, budget=20.0, n_bootstrap=300)
    spend = advice.chosen.groupby("kind")["marginal_cost"].sum()
    assert spend["width"] > 0.5 * advice.spent, spend
    assert advice.std_after[0] < advice.std_before[0]


def test_the_advisor_prefers_a_cooldown_branch_to_a_new_trunk_of_the_same_length():
    rng = np.random.default_rng(4)
    pts = synthetic_study(rng, [1e4, 3e4, 1e5], [2e4, 4e4, 8e4])
    pool = pd.DataFrame(
        [
            {"candidate": "branch", "N": 1e5, "D": 1.2e5, "cost": 2.4, "group": "", "branch_cost": 2.4},
            {"candidate": "trunk", "N": 1e5, "D": 1.2e5, "cost": 12.0, "group": "1e5|3", "branch_cost": 2.4},
        ]
    )
    advice = advise(pts, pool, [Target("t", 3e5, 3.2e5)], budget=3.0, n_bootstrap=200)
    assert list(advice.chosen["candidate"]) == ["branch"]


def test_a_group_pays_one_trunk_and_the_cooldowns_of_its_branches():
    pool = pd.DataFrame(
        {
            "N": [1, 1, 1, 2],
            "D": [10, 20, 40, 10],
            "cost": [1.0, 2.0, 4.0, 3.0],
            "branch_cost": [0.2, 0.4, 0.8, 0.6],
            "group": ["a", "a", "a", ""],
        }
    )
    assert set_cost(pool, [0, 1]) == pytest.approx(2.0 + 0.2)
    assert set_cost(pool, [0, 1, 2, 3]) == pytest.approx(4.0 + 0.2 + 0.4 + 3.0)


def test_a_pool_without_groups_pays_each_candidate_its_own_cost():
    """The group and branch_cost columns are optional (ScaleBench's pools have neither)."""
    pool = pd.DataFrame({"N": [1, 2, 3], "D": [10, 20, 40], "cost": [1.0, 2.0, 4.0]})
    assert set_cost(pool, [0, 2]) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: parse_targets({"model": "nepa_xxl", "epochs": 800}, "s.yaml"), "unknown model 'nepa_xxl'"),
        (lambda: parse_targets({"model": "nepa_h14"}, "s.yaml"), "exactly one budget"),
        (
            lambda: parse_targets({"model": "nepa_h14", "images": 0}, "s.yaml"),
            "images: expected a positive number",
        ),
        (lambda: parse_target_option("nepa_h14:weeks=3"), "KIND one of images, epochs, flops"),
    ],
)
def test_bad_targets_are_refused_in_one_line(call, message):
    with pytest.raises(ConfigError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_advice_tables_are_refused_before_any_fit():
    pts = synthetic_study(np.random.default_rng(0), [1e4, 3e4, 1e5], [2e4, 4e4])
    pool = pd.DataFrame({"N": [1e4], "D": [8e4], "cost": [1.0]})
    target = [Target("t", 3e5, 3.2e5)]
    for args, message in (
        ((pts, pool, target, 0.0), "budget: expected a positive number of GPU-hours, got 0"),
        ((pts.iloc[:0], pool, target, 1.0), "no completed run"),
        ((pts, pool, [], 1.0), "no target"),
    ):
        with pytest.raises(FitError, match=message):
            advise(*args)


# ----------------------------------------------------------------------------- the closed loop, for real


def tiny_study(root: Path) -> Path:
    """Three widths x two budgets of a one-block NEPA on the digits (WSD: a trunk and a branch per
    width, checkpoints kept for later branches), whose target is a wider model trained longer."""
    spec = {
        "name": "tiny",
        "base": str(DIGITS_CONFIG),
        "set": {
            "model.overrides.depth": 1,
            "model.attention": "sdpa",
            "budget.global_batch": 32,
            "optim.schedule": "wsd",
            "optim.warmup_steps": 2,
            "optim.cooldown_fraction": 0.25,
            "logging.progress": "never",
            "logging.log_every": 4,
            "logging.eval_every": 0,
            "logging.eval_batches": 1,
            "checkpoint.every": 4,
            "checkpoint.keep_every": 4,
            "deepspeed.zero_stage": 0,
        },
        "axes": [
            {"zip": {"model.overrides.dim": [8, 16, 32], "model.overrides.num_heads": [1, 1, 2]}},
            {"grid": {"budget.images": [256, 512]}},
        ],
        "profile": "cpu",
        "resources": {"array_parallelism": 2},
        "output_root": str(root / "runs"),
        "target": {
            "model": "nepa_tiny",
            "overrides": {"dim": 64, "num_heads": 4, "depth": 1},
            "images": 2048,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "sweep.yaml"


def loop_cmd(sweep_file: Path) -> list[str]:
    return [
        sys.executable, "-m", "nepa_scale.cli", "sweep", "launch", str(sweep_file), "--executor", "local",
        "--advise", "--budget-gpu-hours", "1.2e-6", "--until-interval", "0.001", "--rounds", "2",
        "--quantity", "val_cosine_distance", "--bootstrap", "60",
    ]  # fmt: skip


def study_state(root: Path) -> dict:
    """Each advice file's runs, and every run's final held-out loss and number of submissions."""
    state = {"advice": {}, "runs": {}}
    for path in sorted((root / "runs" / "advice").glob("*.yaml")):
        state["advice"][path.name] = sorted(run.run_id for run in load_sweep(path).runs)
    for run_json in sorted((root / "runs").glob("*/run.json")):
        run = RunDir(run_json.parent)
        evals = [m for m in run.read_metrics() if m.get("kind") == "eval"]
        launches = json.loads(run.launch_json.read_text())["jobs"]
        state["runs"][run.root.name] = (run.record().status, evals[-1]["val_loss"], len(launches))
    return state


def test_the_closed_loop_killed_between_rounds_goes_on_where_it_was(tmp_path):
    """Two loops over the same tiny study, side by side: one left alone, one killed (SIGKILL, its jobs
    left running, as when the node running it goes) once its first advice file is written, then
    started again.
    Both end with the same advice files, the same runs and the same losses, and no run was
    submitted twice; the advice files are sweep files whose runs carry the study's ids."""
    calm, killed = tiny_study(tmp_path / "calm"), tiny_study(tmp_path / "killed")
    left_alone = subprocess.Popen(
        loop_cmd(calm), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first = subprocess.Popen(
        loop_cmd(killed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    advice = tmp_path / "killed" / "runs" / "advice" / "advice-01.yaml"
    while not advice.is_file() and first.poll() is None:
        time.sleep(0.2)
    assert advice.is_file(), "the loop never wrote its first advice"
    first.kill()
    first.wait()
    again = subprocess.run(loop_cmd(killed), env=env(), capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out, _ = left_alone.communicate(timeout=1800)
    assert left_alone.returncode == 0, out[-3000:]
    assert "stop: 2 rounds of advice done" in out
    calm_state, killed_state = study_state(tmp_path / "calm"), study_state(tmp_path / "killed")
    assert calm_state == killed_state
    assert len(calm_state["advice"]) == 2 and all(calm_state["advice"].values())
    assert all(
        status == "completed" and submitted == 1 for status, _, submitted in calm_state["runs"].values()
    )
    base = {run.run_id for run in load_sweep(calm).runs}
    advised = {run_id for ids in calm_state["advice"].values() for run_id in ids}
    assert base <= set(calm_state["runs"]) and advised <= set(calm_state["runs"])
    assert len(calm_state["runs"]) == len(base | advised)  # a run advised again is the same run, not a copy


def test_sweep_advise_refuses_bad_input_in_one_line_before_any_work(tmp_path, capsys):
    """A target not in the zoo, a budget of 0, a study with no completed run: one line each, exit
    2 or 1, and nothing written (no advice file, no run directory)."""
    from nepa_scale.cli import main

    good = tiny_study(tmp_path / "s")
    spec = yaml.safe_load(good.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec | {"target": {"model": "nepa_xxl", "images": 2048}}))
    cases = [
        ([str(bad), "--budget-gpu-hours", "1"], 2, "target.model: unknown model 'nepa_xxl'"),
        (
            [str(good), "--budget-gpu-hours", "0"],
            2,
            "--budget-gpu-hours: expected a positive number of GPU-hours",
        ),
        ([str(good), "--budget-gpu-hours", "1"], 1, "the study has no completed run to fit: launch it first"),
    ]
    for args, code, message in cases:
        assert main(["sweep", "advise", *args]) == code, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    runs = tmp_path / "s" / "runs"
    assert not (runs / "advice").exists() and not list(runs.glob("*/run.json"))
