"""Chinchilla's approach 2, IsoFLOP profiles: per compute budget a parabola of the quantity in
log N and its minimum; power laws N_opt(C) and D_opt(C); resamples of whole runs give the minima
and the exponents intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nepa_scale.errors import FitError
from nepa_scale.scaling.estimates import Estimate, estimate, finite_points, human, judged, parallel_bootstrap

# ----------------------------------------------------------------------------- IsoFLOP (approach 2)


@dataclass
class IsoFlopFit:
    budgets: np.ndarray  # compute per budget
    n_opt: np.ndarray  # parabola minimum per budget
    d_opt: np.ndarray
    loss_opt: np.ndarray
    parabolas: list[np.ndarray]  # coefficients of quantity vs log N (highest power first)
    n_exponent: Estimate  # N_opt ~ C^a
    d_exponent: Estimate  # D_opt ~ C^b
    n_coefficient: float
    d_coefficient: float
    warnings: list[str] = field(default_factory=list)
    # bootstrap: (N exponent, log N coefficient, D exponent, log D coefficient) per resample
    samples: np.ndarray = field(default_factory=lambda: np.empty((0, 4)), repr=False)
    minima: list[Estimate] = field(default_factory=list)  # N_opt per budget, with its interval

    def n_opt_at(self, compute) -> np.ndarray:
        return self.n_coefficient * np.asarray(compute, float) ** self.n_exponent.value

    def d_opt_at(self, compute) -> np.ndarray:
        return self.d_coefficient * np.asarray(compute, float) ** self.d_exponent.value

    def interval_at(self, compute, which: str = "N") -> tuple[np.ndarray, np.ndarray]:
        """The 95% interval of N_opt (or D_opt) at ``compute`` over the bootstrap power laws."""
        compute = np.asarray(compute, float)
        if len(self.samples) < 10:
            return np.full(compute.shape, np.nan), np.full(compute.shape, np.nan)
        col = 0 if which == "N" else 2
        logs = self.samples[:, col + 1, None] + self.samples[:, col, None] * np.log(compute)[None]
        return np.exp(np.percentile(logs, 2.5, axis=0)), np.exp(np.percentile(logs, 97.5, axis=0))


def _isoflop_core(c, n, d, q, warnings: list[str] | None):
    budgets, n_opt, d_opt, l_opt, parabolas = [], [], [], [], []
    for budget in np.unique(c):
        m = c == budget
        if len(np.unique(n[m])) < 3:
            if warnings is not None:
                warnings.append(f"budget {budget:.3g}: fewer than 3 model sizes, no parabola")
            continue
        log_n = np.log(n[m])
        coef = np.polyfit(log_n, q[m], 2)
        if coef[0] <= 0:
            if warnings is not None:
                warnings.append(f"budget {budget:.3g}: loss is not convex in log N, no minimum")
            continue
        x_min = -coef[1] / (2 * coef[0])
        if not log_n.min() <= x_min <= log_n.max() and warnings is not None:
            warnings.append(
                f"budget {budget:.3g}: the minimum lies outside the sampled model sizes (extrapolated)"
            )
        slope = np.polyfit(log_n, np.log(d[m]), 1)  # D at fixed C as a function of N
        budgets.append(budget)
        n_opt.append(math.exp(x_min))
        d_opt.append(math.exp(np.polyval(slope, x_min)))
        l_opt.append(float(np.polyval(coef, x_min)))
        parabolas.append(coef)
    return np.array(budgets), np.array(n_opt), np.array(d_opt), np.array(l_opt), parabolas


def _bootstrap_isoflop(task):
    """Per resample: {budget: (N_opt, D_opt)} of the budgets whose parabola has a minimum."""
    seed, count, groups, c, n, d, q = task
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        budgets, n_opt, d_opt, _, _ = _isoflop_core(c[idx], n[idx], d[idx], q[idx], None)
        out.append({float(b): (nn, dd) for b, nn, dd in zip(budgets, n_opt, d_opt, strict=True)})
    return out


def _power_fit(budgets: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, log coefficient) of values ~ coefficient * budgets^exponent."""
    slope, intercept = np.polyfit(np.log(budgets), np.log(values), 1)
    return float(slope), float(intercept)


def fit_isoflop(c, n, d, quantity, runs=None, *, n_bootstrap: int = 1000, seed: int = 0) -> IsoFlopFit:
    """Rows share a compute budget when their ``c`` is equal (pre-registered budgets). Resamples
    draw whole runs (``runs``); each gives every budget's minimum and the two power laws, so the
    minima, the exponents and N_opt(C) at any C get intervals."""
    warnings: list[str] = []
    runs = np.arange(len(c)) if runs is None else np.asarray(runs)
    run_codes = np.unique(runs, return_inverse=True)[1].astype(float)
    c, n, d, run_codes, q = finite_points(
        c, n, d, run_codes, quantity, names=("C", "N", "D", "run", "quantity"), warnings=warnings
    )
    budgets, n_opt, d_opt, l_opt, parabolas = _isoflop_core(c, n, d, q, warnings)
    if len(budgets) < 2:
        raise FitError(
            f"IsoFLOP fit needs at least two compute budgets with 3+ model sizes each, got {len(budgets)}"
        )
    n_fit, d_fit = _power_fit(budgets, n_opt), _power_fit(budgets, d_opt)
    groups = [np.flatnonzero(run_codes == code) for code in np.unique(run_codes)]
    resamples: list[dict] = []
    if n_bootstrap:
        resamples = parallel_bootstrap(_bootstrap_isoflop, n_bootstrap, seed, groups, c, n, d, q)
    minima = []  # per budget: the 95% interval of N_opt over the resamples that found a minimum
    for b, value in zip(budgets, n_opt, strict=True):
        found = np.array([r[float(b)][0] for r in resamples if float(b) in r])
        minimum = judged(estimate(float(value), found))
        sizes = n[c == b]
        if not sizes.min() <= value <= sizes.max():
            reason = f"the minimum lies outside the sampled sizes {human(sizes.min())}-{human(sizes.max())}"
            minimum = Estimate(
                minimum.value,
                minimum.low,
                minimum.high,
                False,
                "; ".join(filter(None, [minimum.reason, reason])),
            )
        minima.append(minimum)
    laws = []
    for r in resamples:
        keys = sorted(k for k in r if k in set(map(float, budgets)))
        if len(keys) >= 2:
            bs = np.array(keys)
            laws.append(
                (
                    *_power_fit(bs, np.array([r[k][0] for k in keys])),
                    *_power_fit(bs, np.array([r[k][1] for k in keys])),
                )
            )
    boot = np.array(laws) if laws else np.empty((0, 4))
    if len(budgets) < 3:
        warnings.append(f"only {len(budgets)} budgets: the N_opt(C) exponent rests on {len(budgets)} points")

    def exponent(value: float, column: int) -> Estimate:
        return judged(estimate(value, boot[:, column]))

    return IsoFlopFit(
        budgets,
        n_opt,
        d_opt,
        l_opt,
        parabolas,
        exponent(n_fit[0], 0),
        exponent(d_fit[0], 2),
        float(math.exp(n_fit[1])),
        float(math.exp(d_fit[1])),
        warnings,
        boot,
        minima,
    )
