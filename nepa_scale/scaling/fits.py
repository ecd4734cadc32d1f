"""Scaling-law fits with honest uncertainty (numpy/scipy; the optimiser is scipy's L-BFGS-B), one
module per family over shared estimates and bootstrap (``estimates.py``):

- ``power_law.py``: L(C) = E + A * C^-alpha on the compute-efficient frontier;
- ``chinchilla.py``: L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and the hold-out of the
  largest model;
- ``isoflop.py``: per compute budget a parabola in log N, its minimum, N_opt(C) and D_opt(C)
  (approach 2);
- ``noise.py``: the seeds' spread at equal (N, D), the width effect against it.

Every fit takes the fitted quantity as data: a probe error, a fine-tune error or a loss (``1 +
loss``: the NEPA loss is a negative cosine in [-1, 1]) are fitted the same way.
"""

from nepa_scale.errors import FitError
from nepa_scale.scaling.chinchilla import (
    CHINCHILLA_PARAMS,
    ChinchillaFit,
    HoldoutResult,
    fit_chinchilla,
    holdout,
    resample,
)
from nepa_scale.scaling.estimates import (
    EXPONENT_BOUNDS,
    MAX_INTERVAL_RATIO,
    Estimate,
    estimate,
    human,
    interval_spread,
    judged,
    parallel_bootstrap,
)
from nepa_scale.scaling.isoflop import IsoFlopFit, fit_isoflop
from nepa_scale.scaling.noise import SeedSpread, WidthEffect, seed_spread, width_effect
from nepa_scale.scaling.power_law import PowerLawFit, fit_power_law, pareto_frontier

__all__ = [
    "CHINCHILLA_PARAMS",
    "EXPONENT_BOUNDS",
    "MAX_INTERVAL_RATIO",
    "ChinchillaFit",
    "Estimate",
    "FitError",
    "HoldoutResult",
    "IsoFlopFit",
    "PowerLawFit",
    "SeedSpread",
    "WidthEffect",
    "estimate",
    "fit_chinchilla",
    "fit_isoflop",
    "fit_power_law",
    "holdout",
    "human",
    "interval_spread",
    "judged",
    "parallel_bootstrap",
    "pareto_frontier",
    "resample",
    "seed_spread",
    "width_effect",
]
