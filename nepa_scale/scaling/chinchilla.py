"""Chinchilla's approach 3: L(N, D) = E + A/N^alpha + B/D^beta on each run's final point.

Huber loss (delta 1e-3) on log L, parameterised as logsumexp(a - alpha log N, b - beta log D, e),
L-BFGS from a grid of initial values, best kept; bootstrap intervals over runs (seeds drawn whole
first, when given). ``holdout``: the fit without the largest model(s), predicting them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from nepa_scale.errors import FitError
from nepa_scale.scaling.estimates import (
    EXPONENT_BOUNDS,
    Estimate,
    estimate,
    finite_points,
    judged,
    parallel_bootstrap,
)

# ----------------------------------------------------------------------------- Chinchilla (approach 3)

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
CHINCHILLA_BOUNDS = {"alpha": EXPONENT_BOUNDS, "beta": EXPONENT_BOUNDS}


def _huber_objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
):
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(t1, t2), e)  # logsumexp of three terms, written out: this is the hot loop
    x1, x2, x3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    total = x1 + x2 + x3
    r = m + np.log(total) - log_l
    absr = np.abs(r)
    loss = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum()
    g = np.clip(r, -delta, delta) / total
    g1, g2 = g * x1, g * x2
    grad = np.array([g1.sum(), g2.sum(), (g * x3).sum(), -(g1 * log_n).sum(), -(g2 * log_d).sum()])
    return loss, grad


def _grid(log_l: np.ndarray) -> np.ndarray:
    """Initial values: alpha, beta in 0..2; log A, log B in 0..25; log E below the smallest loss."""
    floor = float(np.min(log_l))
    es = [floor + math.log(f) for f in (0.05, 0.3, 0.7, 0.95)]
    return np.array(
        [
            (a, b, e, al, be)
            for a, b, e, al, be in itertools.product(
                range(0, 26, 5), range(0, 26, 5), es, np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5)
            )
        ],
        dtype=float,
    )


def _lbfgs(start: np.ndarray, data: tuple, delta: float) -> tuple[float, np.ndarray]:
    # Tight tolerances: the E-A-alpha valley is flat, and a loose stop would pin every bootstrap
    # resample to its starting point (intervals far too narrow).
    res = minimize(
        _huber_objective,
        start,
        args=(*data, delta),
        jac=True,
        method="L-BFGS-B",
        bounds=[(None, None), (None, None), (None, None), EXPONENT_BOUNDS, EXPONENT_BOUNDS],
        options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 5000},
    )
    return float(res.fun), res.x


def _fit_from(starts: np.ndarray, data: tuple, delta: float, top: int) -> np.ndarray:
    """Evaluate every start, refine the ``top`` best with L-BFGS, keep the best result."""
    values = np.array([_huber_objective(s, *data, delta)[0] for s in starts])
    best_val, best = math.inf, starts[0]
    for idx in np.argsort(values)[:top]:
        val, theta = _lbfgs(starts[idx], data, delta)
        if val < best_val:
            best_val, best = val, theta
    return best


def _center(theta: np.ndarray, mu_n: float, mu_d: float, sign: int) -> np.ndarray:
    """Move (a, b) between log N / log D and their centred versions: a - alpha log N = a' - alpha (log N - mu).

    The optimiser works centred, where a and alpha are no longer nearly collinear (far fewer iterations)."""
    out = np.array(theta, dtype=float, copy=True)
    out[..., 0] -= sign * out[..., 3] * mu_n
    out[..., 1] -= sign * out[..., 4] * mu_d
    return out


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = theta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}


@dataclass
class ChinchillaFit:
    params: dict[str, Estimate]
    n_points: int
    n_runs: int
    n_bootstrap: int
    n_label: str
    d_label: str
    quantity: str
    residuals: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)
    samples: np.ndarray = field(
        default_factory=lambda: np.empty((0, 5)), repr=False
    )  # bootstrap, CHINCHILLA_PARAMS

    @property
    def identified(self) -> bool:
        return all(p.identified for p in self.params.values())

    def predict(self, n, d) -> np.ndarray:
        p = {k: v.value for k, v in self.params.items()}
        return (
            p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]
        )

    def band(self, n, d) -> tuple[np.ndarray, np.ndarray]:
        """The 95% band of the prediction over the bootstrap resamples (NaN without them)."""
        n, d = np.asarray(n, float), np.asarray(d, float)
        if len(self.samples) < 10:
            return np.full(n.shape, np.nan), np.full(n.shape, np.nan)
        e, a, b, alpha, beta = (self.samples[:, i, None] for i in range(5))
        preds = e + a / n[None] ** alpha + b / d[None] ** beta
        return np.percentile(preds, 2.5, axis=0), np.percentile(preds, 97.5, axis=0)

    def optimal_allocation(self, compute: float, flops_per_param_datum: float = 6.0) -> tuple[float, float]:
        """The N, D that minimise L(N, D) under C = k N D (closed form of approach 3)."""
        p = {k: v.value for k, v in self.params.items()}
        return _allocation(p["A"], p["B"], p["alpha"], p["beta"], compute, flops_per_param_datum)

    def allocation_interval(self, compute: float, flops_per_param_datum: float = 6.0) -> Estimate:
        """N_opt at ``compute`` with its 95% interval over the bootstrap fits."""
        n, _ = self.optimal_allocation(compute, flops_per_param_datum)
        if len(self.samples) < 10:
            return Estimate(n)
        _, a, b, alpha, beta = self.samples.T
        with np.errstate(all="ignore"):
            ns, _ = _allocation(a, b, alpha, beta, compute, flops_per_param_datum)
        return estimate(n, np.asarray(ns, float))


def _allocation(a, b, alpha, beta, compute: float, k: float):
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    n = g * (compute / k) ** (beta / (alpha + beta))
    return n, compute / (k * n)


def resample(groups: list[np.ndarray], strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The point indices of one bootstrap resample: seeds drawn whole (with replacement), then the
    runs of each drawn seed drawn with replacement; with one seed, simply runs. ``groups``: each
    run's points; ``strata``: each run's seed."""
    labels = np.unique(strata)
    drawn = rng.choice(labels, len(labels)) if len(labels) > 1 else labels
    chosen = []
    for label in drawn:
        members = np.flatnonzero(strata == label)
        chosen += [groups[g] for g in rng.choice(members, len(members))]
    return np.concatenate(chosen)


def _bootstrap_chinchilla(task) -> list[np.ndarray]:
    seed, count, groups, strata, data, starts, delta = task
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = resample(groups, strata, rng)
        sample = tuple(x[idx] for x in data)
        out.append(_fit_from(starts, sample, delta, top=len(starts)))
    return out


def fit_chinchilla(
    n,
    d,
    quantity,
    runs=None,
    *,
    replicates=None,
    delta: float = 1e-3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_label: str = "params",
    d_label: str = "images",
    quantity_label: str = "cosine distance (1 + loss)",
) -> ChinchillaFit:
    """L(N, D) = E + A/N^alpha + B/D^beta by Huber regression on log L; bootstrap over ``runs``
    (a run's points together), and over ``replicates`` (each point's seed) first when given."""
    warnings: list[str] = []
    runs = np.arange(len(n)) if runs is None else np.asarray(runs)
    run_codes = np.unique(runs, return_inverse=True)[1].astype(float)
    replicates = np.zeros(len(n)) if replicates is None else np.asarray(replicates)
    seed_codes = np.unique(replicates, return_inverse=True)[1].astype(float)
    n, d, run_codes, seed_codes, q = finite_points(
        n, d, run_codes, seed_codes, quantity, names=("N", "D", "run", "seed", "quantity"), warnings=warnings
    )
    if len(np.unique(n)) < 2:
        raise FitError(
            "Chinchilla fit needs at least two model sizes (N): with one, alpha and A are not identifiable"
        )
    if len(np.unique(d)) < 2:
        raise FitError(
            "Chinchilla fit needs at least two data budgets (D): with one, beta and B are not identifiable"
        )
    if len(q) < len(CHINCHILLA_PARAMS) + 1:
        raise FitError(
            f"Chinchilla fit needs at least {len(CHINCHILLA_PARAMS) + 1} points for {len(CHINCHILLA_PARAMS)} parameters, got {len(q)}"
        )
    if len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
        warnings.append("fewer than three distinct N or D: exponents are poorly constrained")
    mu_n, mu_d = float(np.log(n).mean()), float(np.log(d).mean())
    data = (np.log(n) - mu_n, np.log(d) - mu_d, np.log(q))
    grid = _center(_grid(data[2]), mu_n, mu_d, +1)
    best_c = _fit_from(grid, data, delta, top=16)
    best = _center(best_c, mu_n, mu_d, -1)
    residuals = np.log(q) - np.log(_theta_to_params_predict(best, n, d))
    groups = [np.flatnonzero(run_codes == code) for code in np.unique(run_codes)]
    strata = np.array([seed_codes[g[0]] for g in groups])
    if len(groups) < 5:
        warnings.append(f"only {len(groups)} runs to resample: bootstrap intervals are unreliable")
    samples: list[np.ndarray] = []
    if n_bootstrap:  # resampled fits run centred on the full data's means, then move back
        # Resamples start from the full fit's optimum and the best grid points (not the whole grid).
        values = np.array([_huber_objective(s, *data, delta)[0] for s in grid])
        starts = np.vstack([best_c, grid[np.argsort(values)[:1]]])
        resamples = parallel_bootstrap(
            _bootstrap_chinchilla, n_bootstrap, seed, groups, strata, data, starts, delta
        )
        samples = [_center(t, mu_n, mu_d, -1) for t in resamples]
    point = _theta_to_params(best)
    boot = (
        np.array([[_theta_to_params(t)[k] for k in CHINCHILLA_PARAMS] for t in samples])
        if samples
        else np.empty((0, 5))
    )
    params = {
        k: judged(
            estimate(point[k], boot[:, i]),
            *CHINCHILLA_BOUNDS.get(k, (None, None)),
            floor=1e-6 * float(q.min()) if k == "E" else None,
        )
        for i, k in enumerate(CHINCHILLA_PARAMS)
    }
    rms = float(np.sqrt(np.mean(residuals**2)))
    if rms > 0.05:
        warnings.append(f"poor fit: RMS residual of log {quantity_label} is {rms:.3f}")
    return ChinchillaFit(
        params, len(q), len(groups), len(samples), n_label, d_label, quantity_label, residuals, warnings, boot
    )


def _theta_to_params_predict(theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    p = _theta_to_params(theta)
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


# ----------------------------------------------------------------------------- hold-out


@dataclass
class HoldoutResult:
    held_out_sizes: list[float]
    predicted: np.ndarray
    observed: np.ndarray
    mean_abs_rel_error: float
    fit: ChinchillaFit


def holdout(n, d, quantity, runs=None, *, largest: int = 1, replicates=None, **fit_kwargs) -> HoldoutResult:
    """Fit approach 3 without the ``largest`` model sizes (bootstrapped over their seeds, when
    ``replicates`` are given), predict those, report the relative error."""
    n, d, q = (np.asarray(x, float) for x in (n, d, quantity))
    sizes = np.unique(n[np.isfinite(n)])
    if len(sizes) <= largest + 1:
        raise FitError(
            f"hold-out of {largest} size(s) needs at least {largest + 2} model sizes, got {len(sizes)}"
        )
    held = sizes[-largest:]
    train = ~np.isin(n, held)
    runs_arr = None if runs is None else np.asarray(runs)
    seeds = None if replicates is None else np.asarray(replicates)[train]
    fit = fit_chinchilla(
        n[train],
        d[train],
        q[train],
        None if runs_arr is None else runs_arr[train],
        replicates=seeds,
        **fit_kwargs,
    )
    test = np.isin(n, held) & np.isfinite(q)
    predicted = fit.predict(n[test], d[test])
    err = float(np.mean(np.abs(predicted - q[test]) / q[test]))
    return HoldoutResult(list(held), predicted, q[test], err, fit)
