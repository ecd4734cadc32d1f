"""A saturating power law, L(x) = E + A x^-alpha, fitted by least squares on log L (the
compute-efficient frontier), and the frontier itself."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

from nepa_scale.errors import FitError
from nepa_scale.scaling.estimates import EXPONENT_BOUNDS, Estimate, estimate, finite_points, judged

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
    x, q = finite_points(x, quantity, names=(x_label, "quantity"), warnings=warnings)
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
    raw = [estimate(point[i], samples[:, i]) for i in range(3)]
    est = [judged(raw[0], floor=1e-6 * float(q.min())), judged(raw[1]), judged(raw[2], *EXPONENT_BOUNDS)]
    if len(q) < 8:
        warnings.append(f"only {len(q)} points on the frontier: the exponent is poorly constrained")
    return PowerLawFit(est[0], est[1], est[2], len(q), x_label, quantity_label, warnings, samples)
