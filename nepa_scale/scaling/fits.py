"""Scaling-law fits with honest uncertainty (numpy/scipy; the optimiser is scipy's L-BFGS-B).

The NEPA loss is a negative cosine in [-1, 1]; power laws need a positive quantity that falls to
an irreducible floor, so by default we fit the mean cosine distance ``1 + loss``. Every fit takes
the fitted quantity as data, so a probe error (or anything positive) is fitted the same way.

- ``fit_power_law``: L(C) = E + A * C^-alpha (on the compute-efficient frontier).
- ``fit_chinchilla``: L(N, D) = E + A/N^alpha + B/D^beta, Chinchilla approach 3: Huber loss
  (delta 1e-3) on log L, parameterised as logsumexp(a - alpha log N, b - beta log D, e), L-BFGS
  from a grid of initial values, best kept; bootstrap intervals over runs.
- ``fit_isoflop``: approach 2: per compute budget a parabola of L in log N, its minimum, and power
  laws N_opt(C), D_opt(C).
- ``holdout``: fit without the largest model(s), predict them.
- ``seed_spread``: the spread of replicates (seeds) of the same (N, D): the study's noise floor.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from nepa_scale.errors import FitError

MAX_INTERVAL_RATIO = 10.0  # a 95% interval wider than this factor (high / low) is not a result


@dataclass
class Estimate:
    """A fitted number, its 95% bootstrap interval, and whether the data identify it.

    A parameter at a bound of its search, with an interval spanning more than a factor of
    ``MAX_INTERVAL_RATIO``, with an interval of zero width (the resamples cannot move it: pinned),
    or without an interval is not identified: reports show the reason instead of the number."""

    value: float
    low: float = math.nan  # 95% bootstrap interval
    high: float = math.nan
    identified: bool = True
    reason: str = ""

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def __str__(self) -> str:
        if not self.identified:
            return f"not identified ({self.reason})"
        if not self.has_interval:
            return human(self.value)
        return f"{human(self.value)} [{human(self.low)}, {human(self.high)}]"

    def to_dict(self) -> dict:
        """Plain numbers for fits.json (NaN as null)."""

        def number(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "value": number(self.value),
            "low": number(self.low),
            "high": number(self.high),
            "identified": self.identified,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Estimate:
        def number(x) -> float:
            return math.nan if x is None else float(x)

        return cls(
            number(data["value"]),
            number(data.get("low")),
            number(data.get("high")),
            bool(data.get("identified", True)),
            str(data.get("reason", "")),
        )


def human(x: float) -> str:
    """A number for people: 4 significant digits, no numpy repr (``np.float64(403712.0)``)."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e6:
        return f"{int(x):,}"
    return f"{x:.4g}"


def judged(
    estimate: Estimate,
    lower: float | None = None,
    upper: float | None = None,
    floor: float | None = None,
) -> Estimate:
    """``estimate`` with its identification decided: ``lower``/``upper`` are the bounds of the
    search, ``floor`` a value below which a non-negative parameter counts as at its bound 0."""
    reasons = []
    width = (upper - lower) if lower is not None and upper is not None else None
    tol = 1e-3 * width if width else 1e-9
    for bound, name in ((lower, "lower"), (upper, "upper")):
        if bound is None:
            continue
        if abs(estimate.value - bound) <= tol:
            reasons.append(f"at the {name} bound {human(bound)} of its search")
        elif estimate.has_interval and min(abs(estimate.low - bound), abs(estimate.high - bound)) <= tol:
            reasons.append(f"its interval reaches the {name} bound {human(bound)} of its search")
    if floor is not None and estimate.value < floor:
        reasons.append(f"{human(estimate.value)} is at its lower bound 0 (below {floor:.1g})")
    if not estimate.has_interval:
        reasons.append("no bootstrap interval")
    elif estimate.high == estimate.low:
        reasons.append("its interval has zero width: the resamples cannot move it (pinned)")
    elif estimate.low > 0 and estimate.high / estimate.low > MAX_INTERVAL_RATIO:
        reasons.append(f"its 95% interval spans a factor of {estimate.high / estimate.low:.3g}")
    elif estimate.low <= 0 < estimate.high and lower is None:
        reasons.append("its 95% interval includes 0")
    if reasons:
        return Estimate(estimate.value, estimate.low, estimate.high, False, "; ".join(dict.fromkeys(reasons)))
    return Estimate(estimate.value, estimate.low, estimate.high)


def _clean(*arrays: np.ndarray, names: tuple[str, ...], warnings: list[str]) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(a, dtype=float) for a in arrays)
    ok = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        ok &= np.isfinite(a)
    ok &= arrays[-1] > 0
    dropped = int((~ok).sum())
    if dropped:
        warnings.append(f"dropped {dropped} point(s) with NaN/inf or non-positive {names[-1]}")
    return tuple(a[ok] for a in arrays)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) < 10:
        return math.nan, math.nan
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _one_blas_thread() -> None:
    """Each worker owns one core: BLAS threads on top of the processes only oversubscribe."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _parallel_map(fn, tasks: list) -> list:
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(t) for t in tasks]
    # spawn, not fork: forked children inherit BLAS thread pools mid-state and can crawl or hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_one_blas_thread) as pool:
        return list(pool.map(fn, tasks))


# ----------------------------------------------------------------------------- Chinchilla (approach 3)

CHINCHILLA_PARAMS = ("E", "A", "B", "alpha", "beta")
EXPONENT_BOUNDS = (0.0, 5.0)  # the L-BFGS-B bounds of every fitted exponent
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
        return Estimate(n, *_interval(np.asarray(ns, float)))


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
    n, d, run_codes, seed_codes, q = _clean(
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
        chunks = max(1, min(os.cpu_count() or 1, n_bootstrap))
        seeds = np.random.SeedSequence(seed).spawn(chunks)
        counts = [n_bootstrap // chunks + (i < n_bootstrap % chunks) for i in range(chunks)]
        tasks = [(s, c, groups, strata, data, starts, delta) for s, c in zip(seeds, counts, strict=True)]
        samples = [
            _center(t, mu_n, mu_d, -1) for part in _parallel_map(_bootstrap_chinchilla, tasks) for t in part
        ]
    point = _theta_to_params(best)
    boot = (
        np.array([[_theta_to_params(t)[k] for k in CHINCHILLA_PARAMS] for t in samples])
        if samples
        else np.empty((0, 5))
    )
    params = {
        k: judged(
            Estimate(point[k], *(_interval(boot[:, i]) if len(boot) else (math.nan, math.nan))),
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


# ----------------------------------------------------------------------------- saturating power law


@dataclass
class PowerLawFit:
    E: Estimate
    A: Estimate
    alpha: Estimate
    n_points: int
    x_label: str
    quantity: str
    warnings: list[str] = field(default_factory=list)
    samples: np.ndarray = field(
        default_factory=lambda: np.empty((0, 3)), repr=False
    )  # bootstrap (E, A, alpha)

    @property
    def identified(self) -> bool:
        return self.E.identified and self.A.identified and self.alpha.identified

    def params(self) -> dict[str, Estimate]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha}

    def predict(self, x) -> np.ndarray:
        return self.E.value + self.A.value * np.asarray(x, float) ** -self.alpha.value

    def band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """The 95% band of the prediction over the bootstrap resamples (NaN without them)."""
        x = np.asarray(x, float)
        if len(self.samples) < 10:
            return np.full(x.shape, np.nan), np.full(x.shape, np.nan)
        preds = self.samples[:, 0, None] + self.samples[:, 1, None] * x[None] ** -self.samples[:, 2, None]
        return np.percentile(preds, 2.5, axis=0), np.percentile(preds, 97.5, axis=0)


def pareto_frontier(x, y) -> np.ndarray:
    """Indices of the points no other point beats with less or equal x and lower y, by increasing x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.lexsort((y, x))
    keep, best = [], math.inf
    for i in order:
        if np.isfinite(y[i]) and y[i] < best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def _power_law_once(log_x: np.ndarray, log_y: np.ndarray, starts: list | None = None) -> np.ndarray:
    """(log A', alpha, log E) minimising squared log residuals, x already normalised.

    Without ``starts``, L-BFGS runs from a small grid; resamples pass the full fit's optimum."""

    def objective(theta):
        la, alpha, le = theta
        pred = np.logaddexp(la - alpha * log_x, le)
        r = pred - log_y
        w1 = np.exp(la - alpha * log_x - pred)
        w2 = 1 - w1
        return (r**2).sum(), np.array([(2 * r * w1).sum(), (-2 * r * w1 * log_x).sum(), (2 * r * w2).sum()])

    floor = float(log_y.min())
    if starts is None:
        grid = itertools.product((-3.0, -1.0, 0.0, 1.0), (0.1, 0.3, 0.6, 1.0, 2.0), (0.05, 0.5, 0.9))
        starts = [[la, alpha, floor + math.log(frac)] for la, alpha, frac in grid]
    best_val, best = math.inf, None
    for start in starts:
        res = minimize(
            objective,
            start,
            jac=True,
            method="L-BFGS-B",
            bounds=[(None, None), EXPONENT_BOUNDS, (None, None)],
            options={"ftol": 1e-13, "gtol": 1e-10, "maxiter": 5000},
        )
        if res.fun < best_val:
            best_val, best = res.fun, res.x
    return best


def fit_power_law(
    x,
    quantity,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    x_label: str = "FLOPs",
    quantity_label: str = "cosine distance (1 + loss)",
) -> PowerLawFit:
    """L(x) = E + A x^-alpha by least squares on log L, points resampled for 95% intervals."""
    warnings: list[str] = []
    x, q = _clean(x, quantity, names=(x_label, "quantity"), warnings=warnings)
    if len(q) < 4:
        raise FitError(f"power-law fit needs at least 4 points for 3 parameters, got {len(q)}")
    if len(np.unique(x)) < 3:
        raise FitError(f"power-law fit needs at least 3 distinct {x_label} values, got {len(np.unique(x))}")
    x0 = float(np.min(x))
    log_x, log_y = np.log(x / x0), np.log(q)
    theta = _power_law_once(log_x, log_y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(q), len(q))
        if len(np.unique(log_x[idx])) >= 3:
            boot.append(_power_law_once(log_x[idx], log_y[idx], starts=[theta]))
    boot = np.array(boot) if boot else np.empty((0, 3))

    def to_params(t):
        return math.exp(t[2]), math.exp(t[0]) * x0 ** t[1], t[1]

    point = to_params(theta)
    samples = np.array([to_params(t) for t in boot]) if len(boot) else np.empty((0, 3))
    raw = [
        Estimate(point[i], *(_interval(samples[:, i]) if len(samples) else (math.nan, math.nan)))
        for i in range(3)
    ]
    est = [judged(raw[0], floor=1e-6 * float(q.min())), judged(raw[1]), judged(raw[2], *EXPONENT_BOUNDS)]
    if len(q) < 8:
        warnings.append(f"only {len(q)} points on the frontier: the exponent is poorly constrained")
    return PowerLawFit(est[0], est[1], est[2], len(q), x_label, quantity_label, warnings, samples)


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
    c, n, d, run_codes, q = _clean(
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
        chunks = max(1, min(os.cpu_count() or 1, n_bootstrap))
        seeds = np.random.SeedSequence(seed).spawn(chunks)
        counts = [n_bootstrap // chunks + (i < n_bootstrap % chunks) for i in range(chunks)]
        tasks = [(s, k, groups, c, n, d, q) for s, k in zip(seeds, counts, strict=True)]
        resamples = [x for part in _parallel_map(_bootstrap_isoflop, tasks) for x in part]
    minima = []  # per budget: the 95% interval of N_opt over the resamples that found a minimum
    for b, value in zip(budgets, n_opt, strict=True):
        found = np.array([r[float(b)][0] for r in resamples if float(b) in r])
        estimate = judged(Estimate(float(value), *(_interval(found) if len(found) else (math.nan, math.nan))))
        sizes = n[c == b]
        if not sizes.min() <= value <= sizes.max():
            reason = f"the minimum lies outside the sampled sizes {human(sizes.min())}-{human(sizes.max())}"
            estimate = Estimate(
                estimate.value,
                estimate.low,
                estimate.high,
                False,
                "; ".join(filter(None, [estimate.reason, reason])),
            )
        minima.append(estimate)
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
        return judged(Estimate(value, *(_interval(boot[:, column]) if len(boot) else (math.nan, math.nan))))

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
