"""The study's noise floor: the spread of seeds at equal (N, D), and the width effect measured
against it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SeedSpread:
    """Replicates of the same (N, D) that differ only in their seed."""

    cells: int  # (N, D) cells with at least two seeds
    replicates: int  # runs in those cells
    std_log: float  # pooled within-cell standard deviation of log(quantity)
    max_range_log: float  # the widest cell: max - min of log(quantity)

    def __str__(self) -> str:
        return (
            f"seed-to-seed std of log(quantity) {self.std_log:.3g} (about {100 * math.expm1(self.std_log):.2g}% "
            f"of the quantity), pooled over {self.cells} (N, D) cells with {self.replicates} runs; widest cell "
            f"{100 * math.expm1(self.max_range_log):.2g}%"
        )


def seed_spread(n, d, quantity, seeds) -> SeedSpread | None:
    """The pooled within-cell spread of log(quantity) over cells of the same (N, D) with two or more
    seeds; None without replicates. Differences smaller than this are noise, not scaling."""
    n, d, q, seeds = (np.asarray(x) for x in (n, d, quantity, seeds))
    keep = np.isfinite(q) & (q > 0)
    n, d, q, seeds = n[keep], d[keep], np.log(q[keep]), seeds[keep]
    squares, dof, ranges, replicates = 0.0, 0, [], 0
    for cell in {(a, b) for a, b in zip(n.tolist(), d.tolist(), strict=True)}:
        mask = (n == cell[0]) & (d == cell[1])
        if len(np.unique(seeds[mask])) < 2:
            continue
        values = q[mask]
        squares += float(((values - values.mean()) ** 2).sum())
        dof += len(values) - 1
        ranges.append(float(values.max() - values.min()))
        replicates += len(values)
    if not dof:
        return None
    return SeedSpread(len(ranges), replicates, math.sqrt(squares / dof), max(ranges))


@dataclass
class WidthEffect:
    """How much lower the quantity is at the largest model size than at the smallest, at the same D,
    measured against the seed-to-seed spread: the first thing a scaling law in N needs."""

    log_ratio: float  # mean over D of mean log q(smallest N) - mean log q(largest N); > 0: larger is better
    standard_error: float  # of that mean, from the pooled seed spread
    budgets: int  # values of D with both sizes

    @property
    def z(self) -> float:
        return self.log_ratio / self.standard_error if self.standard_error > 0 else math.inf

    def __str__(self) -> str:
        verdict = "stands above" if self.z >= 2 else "does not stand above"
        change = -math.expm1(-self.log_ratio)
        return (
            f"the largest model's quantity is {100 * abs(change):.2g}% {'below' if change >= 0 else 'above'} the "
            f"smallest's at the "
            f"same D (mean over {self.budgets} values of D), {self.z:.2g} standard errors of the seed spread: "
            f"the width effect {verdict} the seed-to-seed noise"
        )


def width_effect(n, d, quantity, spread: SeedSpread) -> WidthEffect | None:
    """The smallest-vs-largest-N difference of mean log(quantity) at each D with both sizes, averaged,
    with its standard error from ``spread`` (None when no D has both sizes)."""
    n, d, q = (np.asarray(x, dtype=float) for x in (n, d, quantity))
    keep = np.isfinite(q) & (q > 0)
    n, d, q = n[keep], d[keep], np.log(q[keep])
    diffs, variances = [], []
    for budget in np.unique(d):
        at = d == budget
        small, large = at & (n == n[at].min()), at & (n == n[at].max())
        if n[at].min() == n[at].max():
            continue
        diffs.append(q[small].mean() - q[large].mean())
        variances.append(spread.std_log**2 * (1 / small.sum() + 1 / large.sum()))
    if not diffs:
        return None
    return WidthEffect(float(np.mean(diffs)), math.sqrt(sum(variances)) / len(diffs), len(diffs))
