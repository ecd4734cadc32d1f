"""Parametric scaling laws fitted by least squares on log q, a whole bootstrap at once.

A ``Law`` says log q = g(x; theta) for inputs x (columns such as N and D). ``fit_law`` minimises
the weighted sum of squared log residuals by Levenberg-Marquardt, vectorised over a batch of
weight vectors: a bootstrap resample is a weight per point (how often it was drawn), so a thousand
refits are one batched solve, not a thousand optimiser calls (about a hundred times faster than
the report's approach-3 fit, which is what lets the advisor refit for every round and the
benchmarks simulate hundreds of studies).

Least squares on log q is the likelihood of the multiplicative seed noise a study measures
(noise.py: the seeds' spread is a standard deviation of log q). The report's approach-3 section
keeps Hoffmann et al.'s Huber fit, for comparison with the literature; predictions of a target and
the advisor use this one, and the prediction check tests exactly what they use.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from nepa_scale.errors import FitError
from nepa_scale.scaling.chinchilla import resample
from nepa_scale.scaling.estimates import EXPONENT_BOUNDS, Estimate, estimate, judged

LogPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (theta (B, P), x (n, k)) -> (B, n)
Jacobian = Callable[[np.ndarray, np.ndarray], np.ndarray]  # -> (B, n, P)


@dataclass(frozen=True)
class Law:
    """log q = ``log_predict(theta, x)``; ``starts(x, log_q)`` proposes initial values (S, P)."""

    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    log_predict: LogPredict
    starts: Callable[[np.ndarray, np.ndarray], np.ndarray]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    jacobian: Jacobian | None = None  # None: central differences
    # Where each bootstrap resample starts, from the full fit's optimum (None: that optimum alone).
    restarts: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
    exponents: tuple[str, ...] = ()  # parameters reported with their identification
    # Which input each exponent extrapolates along (an exponent along N is pinned only by N's values).
    exponent_inputs: dict[str, str] = field(default_factory=dict)

    def jac(self, theta: np.ndarray, x: np.ndarray) -> np.ndarray:
        if self.jacobian is not None:
            return self.jacobian(theta, x)
        steps = 1e-6 * np.maximum(1.0, np.abs(theta))
        out = np.empty((theta.shape[0], x.shape[0], theta.shape[1]))
        for p in range(theta.shape[1]):
            up, down = theta.copy(), theta.copy()
            up[:, p] += steps[:, p]
            down[:, p] -= steps[:, p]
            out[:, :, p] = (self.log_predict(up, x) - self.log_predict(down, x)) / (2 * steps[:, p, None])
        return out


# ----------------------------------------------------------------------------- Chinchilla in log space


def _chinchilla_terms(theta: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """(log q, the three terms' shares of q): log q = logsumexp(a - alpha ln N, b - beta ln D, e)."""
    a, b, e, alpha, beta = (theta[:, i, None] for i in range(5))
    t1, t2 = a - alpha * np.log(x[:, 0]), b - beta * np.log(x[:, 1])
    top = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = x1 + x2 + x3
    return top + np.log(total), (x1 / total, x2 / total, x3 / total)


def _chinchilla_log(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _chinchilla_terms(theta, x)[0]


def _chinchilla_jacobian(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    _, (s1, s2, s3) = _chinchilla_terms(theta, x)
    s3 = np.broadcast_to(s3, s1.shape)
    return np.stack([s1, s2, s3, -s1 * np.log(x[:, 0]), -s2 * np.log(x[:, 1])], axis=-1)


def _chinchilla_starts(x: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s grid: alpha, beta in 0..2, log A, log B in 0..25; log E below the smallest q."""
    floor = float(np.min(log_q))
    es = [floor + math.log(f) for f in (0.05, 0.3, 0.7, 0.95)]
    grid = itertools.product(
        range(0, 26, 5), range(0, 26, 5), es, np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5)
    )
    return np.array(list(grid), dtype=float)


def _chinchilla_restarts(theta: np.ndarray, x: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """The full fit's optimum, and the same with the floor E switched on at two levels: where the
    full data put E at 0, its gradient vanishes there, and a resample whose best law has a floor
    would never find it from the optimum alone (checked against scipy's least_squares from the whole
    grid: with these three starts every resample reached the same minimum)."""
    floor = float(np.min(log_q))
    lit = [np.concatenate([theta[:2], [floor + math.log(f)], theta[3:]]) for f in (0.3, 0.7)]
    return np.stack([theta, *lit])


CHINCHILLA = Law(
    name="chinchilla",
    formula="q = E + A / N^alpha + B / D^beta",
    inputs=("N", "D"),
    params=("log A", "log B", "log E", "alpha", "beta"),
    log_predict=_chinchilla_log,
    starts=_chinchilla_starts,
    lower=(-math.inf, -math.inf, -math.inf, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]),
    upper=(math.inf, math.inf, math.inf, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]),
    jacobian=_chinchilla_jacobian,
    restarts=_chinchilla_restarts,
    exponents=("alpha", "beta"),
    exponent_inputs={"alpha": "N", "beta": "D"},
)


# ----------------------------------------------------------------------------- the batched fit


def _sse(law: Law, theta: np.ndarray, x: np.ndarray, log_q: np.ndarray, w: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        r = law.log_predict(theta, x) - log_q[None]
    out = (w * r * r).sum(axis=1)
    return np.where(np.isfinite(out), out, np.inf)


def levenberg_marquardt(
    law: Law,
    theta: np.ndarray,
    x: np.ndarray,
    log_q: np.ndarray,
    weights: np.ndarray,
    max_iter: int = 100,
    rtol: float = 1e-12,
    xtol: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum_i w_bi (g(x_i; theta_b) - log q_i)^2 for every row b at once, within the law's
    bounds (a step is clipped to them). Returns (theta (B, P), weighted SSE (B,))."""
    lo, hi = np.array(law.lower), np.array(law.upper)
    theta = np.clip(np.array(theta, dtype=float), lo, hi)
    count, n_params = theta.shape
    damping = np.full(count, 1e-3)
    cost = _sse(law, theta, x, log_q, weights)
    active = np.isfinite(cost)
    eye = np.eye(n_params)
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        th, w = theta[rows], weights[rows]
        with np.errstate(all="ignore"):
            r = law.log_predict(th, x) - log_q[None]
            jac = law.jac(th, x)
        wj_t = (jac * w[:, :, None]).transpose(0, 2, 1)
        a = wj_t @ jac  # batched J^T W J (matmul: BLAS, several times einsum's speed here)
        g = (wj_t @ r[:, :, None])[..., 0]
        # Parameters at a bound that the gradient pushes further out stay there this step (an active
        # set): clipping their step instead would stall the others.
        held = ((th <= lo) & (g > 0)) | ((th >= hi) & (g < 0))
        g = np.where(held, 0.0, g)
        a = np.where(held[:, :, None] | held[:, None, :], 0.0, a) + eye * held[:, :, None]
        diag = np.diagonal(a, axis1=1, axis2=2)
        floor = 1e-9 * diag.max(axis=1, keepdims=True) + 1e-12
        damped = a + damping[rows, None, None] * eye * (diag + floor)[:, None, :]
        ok = np.all(np.isfinite(damped), axis=(1, 2)) & np.all(np.isfinite(g), axis=1)
        step = np.zeros_like(th)
        if ok.any():
            try:
                step[ok] = -np.linalg.solve(damped[ok], g[ok][..., None])[..., 0]
            except np.linalg.LinAlgError:  # a degenerate resample (one N left): least squares instead
                step[ok] = -(np.linalg.pinv(damped[ok]) @ g[ok][..., None])[..., 0]
        trial = np.clip(th + step, lo, hi)
        trial_cost = _sse(law, trial, x, log_q, w)
        better = ok & (trial_cost < cost[rows])
        gain = np.where(better, cost[rows] - trial_cost, 0.0)
        theta[rows[better]] = trial[better]
        cost[rows[better]] = trial_cost[better]
        damping[rows] = np.where(better, np.maximum(damping[rows] / 3, 1e-9), damping[rows] * 4)
        small = np.abs(step).max(axis=1) <= xtol * (1 + np.abs(th).max(axis=1))
        done = (better & (gain <= rtol * (1 + cost[rows])) & small) | (damping[rows] > 1e12) | ~ok
        active[rows[done]] = False
    return theta, cost


@dataclass
class LawFit:
    """A law fitted to (x, q) with its bootstrap draws: the point estimate ``theta`` and one
    parameter vector per resample in ``samples`` (the parameter uncertainty, the advisor's ensemble)."""

    law: Law
    theta: np.ndarray
    samples: np.ndarray
    n_points: int
    n_runs: int
    residual_std: float  # sqrt(SSE / (points - params)): the scatter around the law, in log q
    inputs_seen: dict[str, np.ndarray]  # the distinct values of each input the fit saw

    def log_predict(self, x) -> np.ndarray:
        return self.law.log_predict(self.theta[None], _as_inputs(x))[0]

    def log_draws(self, x) -> np.ndarray:
        """log q at ``x`` under every bootstrap draw: (draws, points)."""
        return self.law.log_predict(self.samples, _as_inputs(x))

    def exponent(self, name: str) -> Estimate:
        """An exponent with its 95% interval, judged against the law's bounds (identified or why not)."""
        i = self.law.params.index(name)
        return judged(estimate(self.theta[i], self.samples[:, i]), self.law.lower[i], self.law.upper[i])


def _as_inputs(x) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[None] if x.ndim == 1 else x


def best_start(law: Law, x: np.ndarray, log_q: np.ndarray, top: int = 16) -> np.ndarray:
    """The law fitted from the ``top`` best of its starting values (the lowest sum of squares)."""
    starts = law.starts(x, log_q)
    ones = np.ones((len(starts), len(log_q)))
    order = np.argsort(_sse(law, starts, x, log_q, ones))[:top]
    refined, cost = levenberg_marquardt(law, starts[order], x, log_q, ones[: len(order)])
    return refined[np.argmin(cost)]


def bootstrap_weights(runs: np.ndarray, seeds: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, points) multiplicities of resamples drawn as the report's fits draw them: seeds whole,
    then the runs within each drawn seed, a run's points together (chinchilla.resample)."""
    run_codes = np.unique(runs, return_inverse=True)[1]
    groups = [np.flatnonzero(run_codes == code) for code in range(run_codes.max() + 1)]
    strata = np.array([seeds[g[0]] for g in groups])
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(resample(groups, strata, rng), minlength=len(runs)) for _ in range(count)])


RANDOM_STARTS = 3  # per resample, drawn from the law's starting grid
TIE = 0.01  # fits within this share of the residual variance of each other count as equally good


def _resampled_fits(
    law: Law, theta: np.ndarray, x: np.ndarray, log_q: np.ndarray, weights: np.ndarray, seed: int
) -> np.ndarray:
    """One parameter vector per resample (a row of ``weights``). Each resample is refitted from the
    full fit's restarts and from RANDOM_STARTS points of the starting grid; among its equally good
    results (within TIE of the residual variance) one is drawn at random. Where the data pin the law,
    every start reaches the same optimum and this is the plain bootstrap; along a direction the data
    leave flat (two model sizes: the floor E against the N exponent) the draws spread over the
    starting grid instead of all staying where the full fit stopped, so the ensemble shows what the
    study does not know, which is what the advisor weighs."""
    count = len(weights)
    rng = np.random.default_rng([seed, 1])
    fixed = law.restarts(theta, x, log_q) if law.restarts is not None else theta[None]
    grid = law.starts(x, log_q)
    starts = np.concatenate(
        [np.repeat(fixed, count, axis=0), grid[rng.integers(0, len(grid), RANDOM_STARTS * count)]]
    )
    tries = len(fixed) + RANDOM_STARTS
    fitted, cost = levenberg_marquardt(law, starts, x, log_q, np.tile(weights, (tries, 1)))
    fitted, cost = fitted.reshape(tries, count, -1), cost.reshape(tries, count)
    residual_var = float(np.mean((log_q - law.log_predict(theta[None], x)[0]) ** 2))
    good = cost <= cost.min(axis=0) + TIE * max(residual_var, 1e-12) * weights.sum(axis=1) / len(log_q)
    pick = np.array([rng.choice(np.flatnonzero(good[:, b])) for b in range(count)])
    return fitted[pick, np.arange(count)]


def fit_law(
    law: Law,
    x,
    q,
    runs=None,
    seeds=None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> LawFit:
    """``law`` by least squares on log q, then ``n_bootstrap`` resamples (seeds whole, then runs:
    ``bootstrap_weights``), each refitted by ``_resampled_fits``."""
    x = np.asarray(x, dtype=float).reshape(len(q), -1)
    q = np.asarray(q, dtype=float)
    keep = np.all(np.isfinite(x), axis=1) & (x > 0).all(axis=1) & np.isfinite(q) & (q > 0)
    x, log_q = x[keep], np.log(q[keep])
    runs = np.arange(len(keep)) if runs is None else np.asarray(runs)
    seeds = np.zeros(len(keep)) if seeds is None else np.asarray(seeds)
    runs, seeds = runs[keep], seeds[keep]
    if len(log_q) <= len(law.params):
        raise FitError(
            f"{law.name}: {len(law.params)} parameters need more than {len(law.params)} points, got {len(log_q)}"
        )
    for i, name in enumerate(law.inputs):
        if len(np.unique(x[:, i])) < 2:
            raise FitError(f"{law.name}: needs at least two distinct {name}, got {len(np.unique(x[:, i]))}")
    theta = best_start(law, x, log_q)
    residual = log_q - law.log_predict(theta[None], x)[0]
    residual_std = float(np.sqrt((residual**2).sum() / (len(log_q) - len(law.params))))
    samples = np.empty((0, len(law.params)))
    if n_bootstrap:
        samples = _resampled_fits(
            law, theta, x, log_q, bootstrap_weights(runs, seeds, n_bootstrap, seed), seed
        )
        samples = samples[np.all(np.isfinite(samples), axis=1)]
    seen = {name: np.unique(x[:, i]) for i, name in enumerate(law.inputs)}
    return LawFit(law, theta, samples, len(log_q), len(np.unique(runs)), residual_std, seen)
