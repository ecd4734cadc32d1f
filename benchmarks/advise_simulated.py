"""Simulated NEPA studies: the advisor against the fixed grid and random choice, at equal GPU-hours.

Each study has a ground-truth Chinchilla law in linear-probe error, q = E + A/N^alpha + B/D^beta,
with its own parameters (errors of 0.5-0.9 at the smallest model and budget, a floor of 0.10-0.25),
and every run observes it with log-normal seed noise (std of log 0.13, what the demo measured).
The target is NEPA-H/14 after 800 ImageNet epochs (1.02e9 images). Costs are the planner's: the
candidate pool that ``sweep advise`` builds for sweeps/scaling_imagenet_wsd.yaml on the ``h100``
profile (the zoo's S/B/L/H at the study's budgets, their midpoints and longer ones below the
target, seeds 0-3), with WSD trunks and cooldown branches priced as the planner prices them.

Designs, each predicting the target with the library's predict_targets (least squares on log q,
bootstrap, one run's seed noise):

- grid: the runs of sweeps/scaling_imagenet_wsd.yaml, G GPU-hours;
- advisor at G/2 and at G: a seed design (S, B, L at the two shortest budgets, seed 0), then
  ``--rounds`` rounds of scaling.advise.advise, each spending its share of what is left;
- random at G/2 and at G: the same seed design, then candidates in a random order while they fit;
- oracle at G/2, a bound rather than a method: the same greedy choice made with the true law's
  linearisation (Fisher information at the true parameters), which no real study has.

Reported per design: mean and median |log error| of the prediction against the true law at the
target, and the share of studies whose 95% interval covers a new run at the target (the law plus
one seed's noise, what the group would observe) and the law's own value.

    python benchmarks/advise_simulated.py [--studies 200] [--bootstrap 200] [--rounds 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.errors import FitError
from nepa_scale.launch.advice import candidate_pool, resolve_targets
from nepa_scale.launch.plan import plan_run, totals
from nepa_scale.launch.sweep import load_sweep
from nepa_scale.launch.targets import TargetSpec
from nepa_scale.scaling.advise import Costs, advise, set_cost
from nepa_scale.scaling.laws import CHINCHILLA
from nepa_scale.scaling.target import Target, predict_targets

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "sweeps" / "scaling_imagenet_wsd.yaml"
TARGET = TargetSpec("nepa_h14", "images", 800 * 1_281_167, label="NEPA-H/14, 800 epochs")
NOISE = 0.13


def study_pool() -> tuple[pd.DataFrame, Target, list[str], float]:
    """The candidate pool of the ImageNet study (no run trained yet), the target, the grid's run ids
    and its GPU-hours (the planner's, branches at their cooldown)."""
    with tempfile.TemporaryDirectory() as root:
        sweep = load_sweep(SWEEP, output_root=root)
        (target,) = resolve_targets(sweep, [TARGET], record=False)
        pool = candidate_pool(sweep, [target], planned_are_candidates=True)
        grid_hours = totals([plan_run(run) for run in sweep.runs]).spent
    grid = [run.run_id for run in sweep.runs]
    missing = set(grid) - set(pool["candidate"])
    if missing:
        raise SystemExit(f"the pool lacks grid runs {sorted(missing)}: the pool and the sweep disagree")
    pool["trunk_key"] = pool["group"].str.replace("|new", "", regex=False)
    return pool.reset_index(drop=True), target, grid, grid_hours


def true_law(rng: np.random.Generator, pool: pd.DataFrame) -> dict[str, float]:
    """A random ground truth: the N and D terms each 0.2-0.4 at the smallest N and D of the pool."""
    alpha, beta = rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.5)
    return {
        "E": rng.uniform(0.10, 0.25),
        "alpha": alpha,
        "beta": beta,
        "A": rng.uniform(0.2, 0.4) * pool["N"].min() ** alpha,
        "B": rng.uniform(0.2, 0.4) * pool["D"].min() ** beta,
    }


def law(p: dict[str, float], n, d):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


class Design:
    """Runs observed so far (pool rows) with their simulated quantity, and what they cost."""

    def __init__(
        self, pool: pd.DataFrame, p: dict, noise: np.ndarray, rng: np.random.Generator, target: Target
    ):
        self.pool, self.p, self.noise, self.rng = pool, p, noise, rng  # noise: each candidate's seed draw
        self.target = target
        self.chosen: list[int] = []

    def observe(self, rows: list[int]) -> None:
        self.chosen += [r for r in rows if r not in self.chosen]

    @property
    def spent(self) -> float:
        return set_cost(self.pool, self.chosen)

    def points(self) -> pd.DataFrame:
        rows = self.pool.iloc[self.chosen]
        noise = np.exp(NOISE * self.noise[self.chosen])
        return pd.DataFrame(
            {
                "N": rows["N"].to_numpy(),
                "D": rows["D"].to_numpy(),
                "seed": rows["seed"].to_numpy(),
                "run_id": rows["candidate"].to_numpy(),
                "quantity": law(self.p, rows["N"], rows["D"]) * noise,
            }
        )

    def remaining_pool(self) -> pd.DataFrame:
        """Candidates not yet run, priced as candidate_pool prices them once runs exist: a budget no
        longer than a trained trunk of its model and seed is a branch of it (its cooldown)."""
        done = self.pool.iloc[self.chosen]
        longest = done.groupby("trunk_key")["D"].max().to_dict()
        left = self.pool.drop(index=self.chosen).copy()
        trained = left["trunk_key"].map(longest)
        branch = trained.notna() & (left["D"] < trained)
        left.loc[branch, "cost"] = left.loc[branch, "branch_cost"]
        left.loc[branch, "group"] = ""
        left.loc[trained.notna() & ~branch, "group"] = left["trunk_key"] + "|new"
        return left


def seed_design(pool: pd.DataFrame) -> list[int]:
    """S, B and L at the two shortest budgets, seed 0: six points, three sizes, a trunk and a branch each."""
    budgets = sorted(pool["D"].unique())[:2]
    rows = pool[
        (pool["seed"] == 0)
        & pool["D"].isin(budgets)
        & pool["model"].isin(["nepa_s14", "nepa_b14", "nepa_l14"])
    ]
    return list(rows.index)


def run_advisor(
    design: Design, target: Target, budget: float, rounds: int, n_bootstrap: int, seed: int, power: float
) -> None:
    for r in range(rounds):
        left = budget - design.spent
        if left <= 0:
            return
        pool = design.remaining_pool()
        advice = advise(
            design.points(), pool.reset_index(), [target], left / (rounds - r),
            n_bootstrap=n_bootstrap, seed=seed + r, cost_power=power,
        )  # fmt: skip
        if not len(advice.chosen):
            return
        design.observe([int(i) for i in advice.chosen["index"]])


def run_oracle(design: Design, budget: float) -> None:
    """A bound, not a method: the same greedy choice per GPU-hour, made with the true law's
    linearisation (Fisher information at the true parameters), which no study has."""
    p, pool = design.p, design.pool
    theta = np.array([[math.log(p["A"]), math.log(p["B"]), math.log(p["E"]), p["alpha"], p["beta"]]])
    jac = CHINCHILLA.jacobian(theta, pool[["N", "D"]].to_numpy(float))[0]
    at = CHINCHILLA.jacobian(theta, np.array([[design.target.n, design.target.d]]))[0, 0]
    costs = Costs(pool)
    for i in sorted(design.chosen, key=lambda i: -pool["D"].iat[i]):
        costs.choose(i)
    info = jac[design.chosen].T @ jac[design.chosen] / NOISE**2 + 1e-9 * np.eye(len(at))
    spent = design.spent
    while True:
        inverse = np.linalg.inv(info)
        gain = (jac @ inverse @ at) ** 2 / (NOISE**2 + np.einsum("ij,jk,ik->i", jac, inverse, jac))
        marginal = costs.marginal()
        fits = marginal <= budget - spent
        fits[design.chosen] = False
        if not fits.any():
            return
        best = int(np.argmax(np.where(fits, gain / np.maximum(marginal, 1e-9), -np.inf)))
        design.observe([best])
        costs.choose(best)
        spent += marginal[best]
        info += np.outer(jac[best], jac[best]) / NOISE**2


def run_random(design: Design, budget: float) -> None:
    for row in design.rng.permutation(design.pool.index):
        if row in design.chosen:
            continue
        if set_cost(design.pool, [*design.chosen, int(row)]) <= budget:
            design.observe([int(row)])


def score(design: Design, target: Target, n_bootstrap: int, seed: int, observed_target: float) -> dict:
    truth = float(law(design.p, target.n, target.d))
    try:
        (p,) = predict_targets(design.points(), [target], n_bootstrap=n_bootstrap, seed=seed).predictions
    except FitError:
        return {"abs log error": math.nan, "covers run": False, "covers law": False, "width": math.nan}
    return {
        "abs log error": abs(math.log(p.value / truth)),
        "covers run": p.low <= observed_target <= p.high,
        "covers law": p.low <= truth <= p.high,
        "width": (p.high - p.low) / p.value,
        "usable": p.usable,
        "runs": len(design.chosen),
        "gpu_hours": design.spent,
    }


def one_study(job: tuple) -> list[dict]:
    index, pool, target, grid, grid_hours, n_bootstrap, rounds, power = job
    rng = np.random.default_rng([2026, index])
    p = true_law(rng, pool)
    noise = rng.standard_normal(len(pool))  # each candidate's seed noise, shared by every design
    observed_target = float(law(p, target.n, target.d)) * math.exp(NOISE * rng.standard_normal())
    rows = []
    for name, budget in (
        ("grid", grid_hours), ("advisor", grid_hours / 2), ("advisor", grid_hours),
        ("random", grid_hours / 2), ("random", grid_hours), ("oracle", grid_hours / 2),
    ):  # fmt: skip
        design = Design(pool, p, noise, np.random.default_rng([index, 7]), target)
        if name == "grid":
            design.observe(list(pool.index[pool["candidate"].isin(grid)]))
        else:
            design.observe(seed_design(pool))
            if name == "advisor":
                run_advisor(design, target, budget, rounds, n_bootstrap, index, power)
            elif name == "oracle":
                run_oracle(design, budget)
            else:
                run_random(design, budget)
        result = score(design, target, n_bootstrap, index, observed_target)
        rows.append({"study": index, "design": name, "budget": budget / grid_hours, **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cost-power", type=float, default=1.0, help="the advisor's score: gain / cost^POWER"
    )
    parser.add_argument("--out", default=None, help="CSV of every study's results")
    args = parser.parse_args()
    started = time.time()
    pool, target, grid, grid_hours = study_pool()
    print(
        f"pool: {len(pool)} candidates; grid: {len(grid)} runs, {grid_hours:,.0f} GPU-hours; target {target.label}: "
        f"N = {target.n:,.0f}, D = {target.d:,.0f} images, {target.gpu_hours:,.0f} GPU-hours",
        flush=True,
    )
    jobs = [
        (i, pool, target, grid, grid_hours, args.bootstrap, args.rounds, args.cost_power)
        for i in range(args.studies)
    ]
    with ProcessPoolExecutor(max_workers=args.workers) as workers:
        results = [row for rows in workers.map(one_study, jobs) for row in rows]
    table = pd.DataFrame(results)
    if args.out:
        table.to_csv(args.out, index=False)
    summary = table.groupby(["design", "budget"]).agg(
        studies=("study", "count"),
        mean_abs_log_error=("abs log error", "mean"),
        median_abs_log_error=("abs log error", "median"),
        covers_new_run=("covers run", "mean"),
        covers_law=("covers law", "mean"),
        median_width=("width", "median"),
        usable=("usable", "mean"),
        mean_runs=("runs", "mean"),
        gpu_hours=("gpu_hours", "mean"),
    )
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"{args.studies} studies in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
