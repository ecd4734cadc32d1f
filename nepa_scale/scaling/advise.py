"""Which runs to pay for next: the candidates that narrow the target's predictive interval most per
GPU-hour, within a budget.

The criterion is the expected reduction of the targets' predictive variance (of log q), computed
over the bootstrap's parameter draws (``laws.LawFit.samples``). The draws are an ensemble of laws
the data allow; at the targets and at every candidate they give predictions whose covariance says
how much observing a candidate would tell about a target. Observing candidate j (one run, seed
noise s^2 in log q) conditions that covariance C as a Gaussian would:

    C <- C - C[:, j] C[j, :] / (C[j, j] + s^2),

and lowers the variance at target t by C[t, j]^2 / (C[j, j] + s^2). Runs are chosen greedily, the
largest reduction per GPU-hour first, each choice conditioning C before the next, so a batch spreads
itself (a second seed of the same point is worth less once the first is chosen) and costs follow
the design (a cooldown branch of a trunk already there, or chosen, costs only its cooldown).

This is a V-optimal design (the variance of the prediction in the target region) with the posterior
taken from the bootstrap instead of a single linearisation, so it carries the between-basin spread
that Li et al. 2026 ("Spend Less, Fit Better") found a single linearisation misses; the seed noise
of the target run itself cannot be bought down and stays in the interval.

Everything here is a function of plain tables: ``points`` (the observed runs: N, D, quantity,
run_id, seed), ``pool`` (candidates: candidate, N, D, cost, and optionally group and branch_cost),
the targets and a budget; launch/advice.py builds the pool from the zoo and the cluster profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nepa_scale.errors import FitError
from nepa_scale.scaling.laws import CHINCHILLA, Law
from nepa_scale.scaling.target import Target, TargetStudy, predict_targets


@dataclass
class Advice:
    """The chosen runs in the order chosen (``chosen``: the pool's rows plus ``marginal_cost``,
    ``spent`` so far and, per target, the expected 95% interval after the run), and the study now."""

    study: TargetStudy
    chosen: pd.DataFrame
    budget: float
    spent: float
    std_before: list[float]  # per target: predictive std of log q now
    std_after: list[float]  # ... expected after the chosen runs

    def expected_interval(self, i: int, std: float) -> tuple[float, float]:
        """Target ``i``'s 95% predictive interval now, narrowed as its predictive std of log q goes
        from ``std_before`` to ``std``: each end moves towards the prediction in that ratio (log scale)."""
        p = self.study.predictions[i]
        ratio = std / self.std_before[i] if self.std_before[i] > 0 else 1.0
        return p.value * (p.low / p.value) ** ratio, p.value * (p.high / p.value) ** ratio


class Costs:
    """What candidates cost together: in each group (one trunk key: the same model and seed) the
    longest run trains in full and the others branch off it, paying only their cooldown; candidates
    without a group pay their own cost. ``marginal`` prices every candidate against a chosen set at
    once (the greedy loop asks it for every candidate at every step)."""

    def __init__(self, pool: pd.DataFrame):
        self.cost = pool["cost"].to_numpy(float)
        self.branch = pool["branch_cost"].to_numpy(float) if "branch_cost" in pool else self.cost
        self.d = pool["D"].to_numpy(float)
        groups = (
            pool["group"].fillna("").astype(str).to_numpy() if "group" in pool else np.full(len(pool), "")
        )
        codes = {g: k for k, g in enumerate(sorted(set(groups) - {""}))}
        self.group = np.array([codes.get(g, -1) for g in groups])
        self.trunk = np.full(len(codes), -1)  # each group's longest chosen member

    def marginal(self) -> np.ndarray:
        """What each candidate would add to the chosen set's cost."""
        trunk = np.full(len(self.group), -1)  # indexed only where there is a group: a pool may have none
        grouped = self.group >= 0
        trunk[grouped] = self.trunk[self.group[grouped]]
        out = self.cost.copy()
        has = trunk >= 0
        t = trunk[has]
        longer = self.d[has] > self.d[t]
        out[has] = np.where(longer, self.cost[has] - self.cost[t] + self.branch[t], self.branch[has])
        return out

    def choose(self, i: int) -> None:
        g = self.group[i]
        if g >= 0 and (self.trunk[g] < 0 or self.d[i] > self.d[self.trunk[g]]):
            self.trunk[g] = i


def set_cost(pool: pd.DataFrame, members: list[int]) -> float:
    """What the candidates ``members`` (positions in ``pool``) cost together (``Costs``)."""
    costs, total = Costs(pool), 0.0
    for i in sorted(members, key=lambda i: (costs.d[i], -i), reverse=True):  # longest first: trunks
        total += costs.marginal()[i]
        costs.choose(i)
    return total


def check_tables(points: pd.DataFrame, pool: pd.DataFrame, targets: list[Target], budget: float) -> None:
    """One-line refusals before any fitting: what the advisor cannot work with."""
    if not math.isfinite(budget) or budget <= 0:
        raise FitError(f"budget: expected a positive number of GPU-hours, got {budget:g}")
    if not targets:
        raise FitError("no target: name one (a sweep's target: section, or --target MODEL:images=N)")
    if not len(points):
        raise FitError("the study has no completed run to fit: launch it first (nepa-scale sweep launch)")
    missing = [c for c in ("N", "D", "cost") if c not in pool]
    if missing:
        raise FitError(f"the candidate pool needs the column(s) {', '.join(missing)}")
    if "group" in pool and "branch_cost" not in pool:
        raise FitError("the candidate pool has groups but no branch_cost column")


def advise(
    points: pd.DataFrame,
    pool: pd.DataFrame,
    targets: list[Target],
    budget: float,
    *,
    law: Law = CHINCHILLA,
    n_bootstrap: int = 1000,
    seed: int = 0,
    trivial: float | None = None,
    study: TargetStudy | None = None,
    cost_power: float = 1.0,
) -> Advice:
    """Choose from ``pool`` the runs that lower the targets' summed predictive variance of log q
    most per unit of cost, within ``budget`` (the pool's cost unit: GPU-hours)."""
    check_tables(points, pool, targets, budget)
    pool = pool.reset_index(drop=True)
    if study is None:
        study = predict_targets(points, targets, law=law, n_bootstrap=n_bootstrap, seed=seed, trivial=trivial)
    fit, noise = study.fit, study.noise_std**2
    x = np.vstack([[t.coordinates(law) for t in targets], pool[list(law.inputs)].to_numpy(float)])
    draws = fit.log_draws(x)
    draws = draws[np.all(np.isfinite(draws), axis=1)]
    if len(draws) < 10:
        raise FitError(f"{len(draws)} usable bootstrap draws: too few to compare candidates")
    # The draws' tails (a resample with an exponent at its bound) would dominate a plain covariance:
    # each point's predictions are clipped to their central 95% first, the interval reported.
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    draws = np.clip(draws, low, high)
    centred = draws - draws.mean(axis=0)
    cov = centred.T @ centred / (len(draws) - 1)
    n_targets = len(targets)
    before = [math.sqrt(cov[i, i] + noise) for i in range(n_targets)]
    chosen: list[int] = []
    rows: list[dict] = []
    spent = 0.0
    costs = Costs(pool)
    taken = np.zeros(len(pool), dtype=bool)
    while True:
        cand = np.arange(n_targets, len(x))
        gains = (cov[:n_targets, cand] ** 2).sum(axis=0) / (np.diag(cov)[cand] + noise)
        marginal = costs.marginal()
        fits = ~taken & (gains > 0) & (marginal <= budget - spent + 1e-12 * budget)
        if not fits.any():
            break
        score = np.where(fits, gains / np.maximum(marginal, 1e-12 * budget) ** cost_power, -np.inf)
        best = int(np.argmax(score))
        j = best + n_targets
        cov = cov - np.outer(cov[:, j], cov[j, :]) / (cov[j, j] + noise)
        chosen.append(best)
        taken[best] = True
        spent += float(marginal[best])
        costs.choose(best)
        rows.append(
            pool.iloc[best].to_dict()
            | {"marginal_cost": float(marginal[best]), "spent": spent}
            | {f"std after: {t.label}": math.sqrt(max(cov[i, i], 0.0) + noise) for i, t in enumerate(targets)}
        )
    after_std = [math.sqrt(max(cov[i, i], 0.0) + noise) for i in range(n_targets)]
    advice = Advice(study, pd.DataFrame(rows), budget, spent, before, after_std)
    for i, t in enumerate(targets):  # each row: the target's expected interval once it is in
        if rows:
            advice.chosen[f"after: {t.label}"] = [
                advice.expected_interval(i, std) for std in advice.chosen[f"std after: {t.label}"]
            ]
    return advice
