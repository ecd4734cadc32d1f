"""What a study predicts for its target: the fitted quantity of a larger model trained longer, with
a 95% predictive interval, and whether that interval is any use.

The interval is that of the run the group would buy: the law's parameter uncertainty (the
bootstrap draws of ``laws.fit_law``: seeds drawn whole, then runs) plus the seed noise of one run
at the target (a normal draw in log q with the study's seed-to-seed spread, or, without replicates,
the residual scatter around the law). A prediction is flagged as not usable, with the reasons, when
the exponent it extrapolates along is not pinned (fewer than three distinct values below the
target, or not identified by the bootstrap), or when its interval reaches the trivial error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.errors import FitError
from nepa_scale.rundir import write_json_atomic
from nepa_scale.scaling.estimates import human
from nepa_scale.scaling.laws import CHINCHILLA, Law, LawFit, fit_law
from nepa_scale.scaling.noise import seed_spread

MIN_DISTINCT = 3  # values of an input below the target that a saturating power law along it needs
NOISE_DRAW_SEED = 12345  # the seed-noise draws added to the parameter draws (fixed: a report is reproducible)


STUDY_RECORD = "study.json"  # beside the runs: the sweep file and its resolved targets (written at launch)


@dataclass(frozen=True)
class Target:
    """A model and a training budget to predict: its sizes as a study counts them, and the
    planner's GPU-hours for the run (None when they could not be planned here)."""

    label: str  # e.g. "nepa_h14 @ 800 epochs"
    params: float  # N, all parameters
    images: float  # D, images seen
    params_no_embed: float | None = None
    tokens_per_image: int | None = None  # [CLS] + patches: D in patches is images x (tokens - 1)
    gpu_hours: float | None = None
    note: str = ""  # e.g. why the cost is unknown
    extra: dict[str, float] = field(default_factory=dict)  # a law's other inputs (e.g. unique tokens U)

    @property
    def n(self) -> float:
        return self.params

    @property
    def d(self) -> float:
        return self.images

    def inputs(self) -> dict[str, float]:
        """Where a law is evaluated for this target: N, D and any other input it names."""
        return {"N": self.params, "D": self.images, **self.extra}

    def coordinates(self, law: Law) -> list[float]:
        at = self.inputs()
        missing = [name for name in law.inputs if name not in at]
        if missing:
            raise FitError(f"target {self.label}: the law {law.name} needs {', '.join(missing)}")
        return [at[name] for name in law.inputs]

    def counted(self, n_kind: str, d_kind: str) -> Target:
        """The same target with N and D as the study counts them (study.py: n_kind, d_kind)."""
        n = self.params_no_embed if n_kind == "params_no_embed" else self.params
        d = self.images * (self.tokens_per_image - 1) if d_kind == "patches" else self.images
        if n is None or d is None:
            raise FitError(f"target {self.label}: its {n_kind} / {d_kind} are not recorded")
        return replace(self, params=float(n), images=float(d))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != "" and v != {}}

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def write_study_record(root: Path, sweep_file: str, targets: list[Target]) -> None:
    """What the report needs to know of the study beyond its runs: the sweep file and its targets."""
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        root / STUDY_RECORD, {"sweep": str(sweep_file), "targets": [t.to_dict() for t in targets]}
    )


def read_study_record(root: Path) -> dict:
    """study.json ({} for a study launched before targets existed, or outside a sweep)."""
    path = Path(root) / STUDY_RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        data["targets"] = [Target.from_dict(t) for t in data.get("targets", [])]
    except (ValueError, TypeError, KeyError) as exc:
        raise FitError(f"{path}: not a study record ({exc})") from None
    return data


@dataclass
class TargetPrediction:
    target: Target
    value: float  # the law's prediction
    low: float  # 95% predictive interval: parameters and one run's seed noise
    high: float
    fit_low: float  # 95% interval of the law alone (parameters only)
    fit_high: float
    usable: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def relative_width(self) -> float:
        """(high - low) / prediction: what the closed loop compares with --until-interval."""
        return (self.high - self.low) / self.value

    def line(self, quantity: str) -> str:
        cost = f"; the run costs {human(self.target.gpu_hours)} GPU-hours" if self.target.gpu_hours else ""
        head = (
            f"{self.target.label} (N = {human(self.target.n)}, D = {human(self.target.d)}): predicted {quantity} "
            f"{self.value:.4g}, 95% predictive interval [{self.low:.4g}, {self.high:.4g}] "
            f"(width {100 * self.relative_width:.0f}% of the prediction){cost}"
        )
        if self.usable:
            return head
        return head + ". Not usable: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {
            "target": self.target.label,
            "N": self.target.n,
            "D": self.target.d,
            "gpu_hours": self.target.gpu_hours,
            "predicted": self.value,
            "low": self.low,
            "high": self.high,
            "parameters only": [self.fit_low, self.fit_high],
            "relative width": self.relative_width,
            "usable": self.usable,
            "reasons": self.reasons,
        }


@dataclass
class TargetStudy:
    """The law behind the predictions, the seed noise added to them, and the predictions."""

    fit: LawFit
    noise_std: float  # std of log q of one run around the law
    noise_dof: int  # its degrees of freedom
    noise_source: str
    predictions: list[TargetPrediction]


def seed_noise_std(points: pd.DataFrame, fit: LawFit) -> tuple[float, int, str]:
    """One run's scatter around the law, in log q, and its degrees of freedom: the seeds' pooled
    spread at equal (N, D) when the study has replicates (its noise floor), else the residual
    scatter of the fit."""
    if "seed" in points:
        spread = seed_spread(points["N"], points["D"], points["quantity"], points["seed"])
        if spread is not None:
            return (
                spread.std_log,
                spread.replicates - spread.cells,
                f"the seeds' spread at equal (N, D), std of log {spread.std_log:.3g}",
            )
    dof = max(1, fit.n_points - len(fit.law.params))
    return (
        fit.residual_std,
        dof,
        f"no replicates: the fit's residual scatter, std of log {fit.residual_std:.3g}",
    )


def predictive_draws(fit: LawFit, noise_std: float, dof: int, x: np.ndarray) -> np.ndarray:
    """log q at ``x`` for every bootstrap draw plus one run's seed noise: (draws, points). The noise's
    scale is itself drawn (std * sqrt(dof / chi2(dof))), as the study only estimates it: with few
    replicates the tails are Student's t rather than normal."""
    rng = np.random.default_rng(NOISE_DRAW_SEED)
    draws = fit.log_draws(x)
    scale = noise_std * np.sqrt(dof / rng.chisquare(dof, size=(len(draws), 1)))
    return draws + scale * rng.standard_normal(draws.shape)


def why_not_usable(fit: LawFit, target: Target, high: float, trivial: float | None) -> list[str]:
    """The reasons a prediction at ``target`` cannot be relied on (empty: usable)."""
    reasons = []
    at = target.inputs()
    for name in fit.law.exponents:
        along = fit.law.exponent_inputs.get(name)
        if along is None or at[along] <= fit.inputs_seen[along].max():
            continue  # no extrapolation along this input
        below = fit.inputs_seen[along]
        if len(below) < MIN_DISTINCT:
            noun = {"N": "model sizes", "D": "data budgets"}.get(along, f"values of {along}")
            reasons.append(
                f"{len(below)} {noun} below the target: the {along} exponent {name} is not pinned "
                f"(a saturating power law along {along} needs {MIN_DISTINCT})"
            )
            continue
        est = fit.exponent(name)
        if not est.identified:
            reasons.append(f"{name} not identified ({est.reason})")
    if trivial is not None and high >= trivial:
        reasons.append(f"the interval reaches the trivial error {trivial:.3g} (chance)")
    if not math.isfinite(high):
        reasons.append("the interval is unbounded")
    return reasons


def predict_targets(
    points: pd.DataFrame,
    targets: list[Target],
    *,
    law: Law = CHINCHILLA,
    n_bootstrap: int = 1000,
    seed: int = 0,
    trivial: float | None = None,
) -> TargetStudy:
    """Fit ``law`` to ``points`` (columns N, D, quantity, run_id, seed: one row per completed run's
    final point) and predict every target with its 95% predictive interval."""
    seeds = points["seed"].to_numpy() if "seed" in points else None
    fit = fit_law(
        law,
        points[list(law.inputs)].to_numpy(float),
        points["quantity"].to_numpy(float),
        points["run_id"].to_numpy() if "run_id" in points else None,
        seeds,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    noise, dof, source = seed_noise_std(points, fit)
    x = np.array([t.coordinates(law) for t in targets], dtype=float).reshape(len(targets), len(law.inputs))
    predictions = []
    if targets:
        draws = predictive_draws(fit, noise, dof, x)
        fit_draws = fit.log_draws(x)
        for i, target in enumerate(targets):
            value = float(np.exp(fit.log_predict(x[i])[0]))
            low, high = (float(np.exp(v)) for v in np.percentile(draws[:, i], [2.5, 97.5]))
            fit_low, fit_high = (float(np.exp(v)) for v in np.percentile(fit_draws[:, i], [2.5, 97.5]))
            reasons = why_not_usable(fit, target, high, trivial)
            predictions.append(
                TargetPrediction(target, value, low, high, fit_low, fit_high, not reasons, reasons)
            )
    return TargetStudy(fit, noise, dof, source, predictions)
