"""The report's analyses, each a named step over one ``Study`` returning an ``AnalysisResult``.

``run_step`` runs a step and turns a ``FitError`` (too few sizes, budgets or points) into an entry
that says why the fit is not identified: a report always comes out, and never prints a law the data
do not support.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from nepa_scale.scaling import figures
from nepa_scale.scaling.fits import (
    Estimate,
    FitError,
    SeedSpread,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    human,
    pareto_frontier,
    seed_spread,
    width_effect,
)
from nepa_scale.scaling.quantities import (
    MONOTONE_SHARE,
    QUANTITIES,
    diagnostic_correlations,
    label,
    lower_is_better,
    quantity_table,
    short_label,
)
from nepa_scale.scaling.study import AnalysisResult, Study
from nepa_scale.scaling.target import Target, predict_targets

# Before learning starts a quantity sits on a plateau near its initial value, which no power law in
# compute describes. The frontier fit starts where the frontier has covered this fraction of its
# total drop.
PLATEAU_DROP = 0.1
DIAGNOSTICS = ("val_gap_remaining", "rankme_features", "rankme_targets", "val_target_spread")


def not_identified(reason: str) -> dict:
    return {"identified": False, "reason": reason}


def fit_entry(params: dict[str, Estimate], **facts) -> dict:
    """A fit as fits.json holds it: numbers, intervals, and whether each parameter is identified."""
    reasons = [f"{name}: {p.reason}" for name, p in params.items() if not p.identified]
    entry = {"identified": not reasons, "params": {k: v.to_dict() for k, v in params.items()}, **facts}
    if reasons:
        entry["reason"] = "; ".join(reasons)
    return entry


def run_step(step: Callable[[Study], AnalysisResult | None], study: Study) -> AnalysisResult | None:
    """One analysis; a FitError becomes an entry saying why nothing is identified."""
    try:
        return step(study)
    except FitError as exc:
        return AnalysisResult(entry=not_identified(str(exc)))


# ----------------------------------------------------------------------------- the frontier


def frontier_start(frontier: pd.DataFrame, column: str, lower: bool = True) -> float:
    """The FLOPs where the frontier has covered PLATEAU_DROP of its drop (the plateau's end)."""
    q = frontier[column].to_numpy() * (1 if lower else -1)
    reached = q <= q[0] - PLATEAU_DROP * (q[0] - q.min())
    return float(frontier["flops"].to_numpy()[reached.argmax()] if reached.any() else frontier["flops"].min())


def frontier_curves(study: Study) -> tuple[pd.DataFrame, str, str]:
    """(curves, value column, what they are): the training-loss curves when the fitted quantity is a
    NEPA loss, else the fitted quantity at every evaluation point of every run."""
    if (
        study.quantity in ("cosine_distance", "val_cosine_distance")
        or study.quantity not in study.evaluations
    ):
        return study.curves, "cosine_distance", label("cosine_distance") + ", from the loss curves"
    points = study.evaluations[(study.evaluations["flops"] > 0) & study.evaluations[study.quantity].notna()]
    return points, study.quantity, study.quantity_label + ", at every evaluation point of every run"


@dataclass
class Frontier:
    curves: pd.DataFrame  # the points the frontier is taken from
    column: str  # their value column
    points: pd.DataFrame  # the frontier
    start: float  # FLOPs where the fit starts
    fit: Any  # PowerLawFit, or None
    entry: dict[str, Any]
    warnings: list[str]


def fit_frontier(study: Study) -> Frontier | None:
    """The compute-efficient frontier of the fitted quantity and its saturating power law."""
    curves, column, what = frontier_curves(study)
    if not len(curves):
        return None
    s, lower = study.settings, lower_is_better(column)
    values = curves[column] if lower else -curves[column]
    front = curves.iloc[pareto_frontier(curves["flops"], values)]
    start = s.frontier_from if s.frontier_from is not None else frontier_start(front, column, lower)
    fitted = front[front["flops"] >= start]
    facts = {
        "quantity": what + " (mid-run points are fair here)",
        "starts at FLOPs": start,
        "points": len(fitted),
    }
    if fitted["params"].nunique() < 2:
        reason = (
            f"the frontier past {human(start)} FLOPs holds {fitted['params'].nunique()} model size(s): it is "
            "one model's curve, not a law in compute"
        )
        return Frontier(curves, column, front, start, None, not_identified(reason) | facts, [])
    if not lower:
        reason = f"{column} grows with compute: a power law fits errors and losses"
        return Frontier(curves, column, front, start, None, not_identified(reason) | facts, [])
    try:
        fit = fit_power_law(
            fitted["flops"],
            fitted[column],
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            x_label=f"FLOPs ({s.convention})",
            quantity_label=label(column),
        )
    except FitError as exc:
        return Frontier(curves, column, front, start, None, not_identified(str(exc)) | facts, [])
    warnings = [f"frontier: {w}" for w in fit.warnings]
    return Frontier(curves, column, front, start, fit, fit_entry(fit.params(), **facts), warnings)


def frontier(study: Study) -> AnalysisResult | None:
    found = fit_frontier(study)
    if found is None:
        return None
    fig = figures.loss_curves(
        found.curves,
        found.points,
        found.fit,
        short_label(found.column),
        study.settings.convention,
        found.start,
        column=found.column,
    )
    name = "loss_curves" if found.column == "cosine_distance" else "frontier"
    return AnalysisResult(found.entry, found.fit, study.figure(fig, name), found.warnings)


# ----------------------------------------------------------------------------- L(N, D) and IsoFLOP


def chinchilla(study: Study) -> AnalysisResult:
    s, final = study.settings, study.final
    fit = fit_chinchilla(
        final["N"],
        final["D"],
        final["quantity"],
        final["run_id"],
        replicates=final["seed"] if "seed" in final else None,
        n_bootstrap=s.n_bootstrap,
        seed=s.seed,
        n_label=study.n_label,
        d_label=study.d_label,
        quantity_label=study.quantity_short,
    )
    entry = fit_entry(
        fit.params,
        quantity=study.quantity_label,
        points=fit.n_points,
        resampled_units=fit.n_runs,
        bootstrap=fit.n_bootstrap,
    )
    spread = seed_noise(study)
    noise = spread.std_log if spread is not None else None
    figs = study.figure(figures.residuals(final, fit, study.d_label, study.n_label, noise), "residuals")
    return AnalysisResult(entry, fit, figs, [f"Chinchilla: {w}" for w in fit.warnings])


def isoflop(study: Study) -> AnalysisResult | None:
    final = study.final
    rows = final[final["flops_budget"].notna()] if "flops_budget" in final else final.iloc[:0]
    if not len(rows):
        return None
    s = study.settings
    fit = fit_isoflop(
        rows["flops_budget"],
        rows["N"],
        rows["D"],
        rows["quantity"],
        rows["run_id"],
        n_bootstrap=s.n_bootstrap,
        seed=s.seed,
    )
    entry = fit_entry(
        {"N_opt exponent": fit.n_exponent, "D_opt exponent": fit.d_exponent},
        minima=[
            {"C": float(c), "N_opt": m.to_dict(), "D_opt": float(d)}
            for c, m, d in zip(fit.budgets, fit.minima, fit.d_opt, strict=True)
        ],
    )
    curves = figures.isoflop_curves(
        rows.assign(compute=rows["flops_budget"]), fit, study.quantity_short, study.n_label
    )
    figs = study.figure(curves, "isoflop") | study.figure(
        figures.n_opt_vs_compute(fit, study.n_label, s.convention), "n_opt"
    )
    return AnalysisResult(entry, fit, figs, [f"IsoFLOP: {w}" for w in fit.warnings])


def loss_vs_params(study: Study, chinchilla_fit) -> AnalysisResult | None:
    if not len(study.final):
        return None
    fig = figures.loss_vs_params(
        study.final, chinchilla_fit, study.quantity_short, study.n_label, study.d_label
    )
    return AnalysisResult(figures=study.figure(fig, "loss_vs_params"))


# ----------------------------------------------------------------------------- checks of the law


def prediction(study: Study) -> AnalysisResult | None:
    """Fit the law without the largest model and predict it at every D, exactly as a target is
    predicted (target.py: least squares on log q, bootstrap, one run's seed noise), and measure the
    error against the seed spread (standard errors of the seed mean)."""
    s, final = study.settings, study.final
    if not s.holdout_largest:
        return None
    sizes = np.unique(final["N"][np.isfinite(final["N"])])
    if len(sizes) <= s.holdout_largest + 1:
        raise FitError(
            f"hold-out of {s.holdout_largest} size(s) needs at least {s.holdout_largest + 2} model sizes, got {len(sizes)}"
        )
    held = sizes[-s.holdout_largest :]
    test = final[np.isin(final["N"], held)]
    cells = [(float(n), float(d), cell) for (n, d), cell in test.groupby(["N", "D"])]
    targets = [Target(f"N = {human(n)}, D = {human(d)}", n, d) for n, d, _ in cells]
    held_out = predict_targets(
        final[~np.isin(final["N"], held)], targets, n_bootstrap=s.n_bootstrap, seed=s.seed, trivial=None
    )
    spread = seed_noise(study)
    rows = []
    for (n, d, cell), p in zip(cells, held_out.predictions, strict=True):
        observed = cell["quantity"].to_numpy(float)
        log_error = math.log(p.value / observed.mean())
        se = spread.std_log / math.sqrt(len(observed)) if spread else math.nan
        rows += [
            {"N": n, "D": d, "observed": v, "predicted": p.value, "low": p.low, "high": p.high}
            | {"fit_low": p.fit_low, "fit_high": p.fit_high}
            for v in observed
        ]
        rows[-1] |= {"log error": log_error, "z": log_error / se if se > 0 else math.nan}
    points = pd.DataFrame(rows)
    per_d = points.dropna(subset=["log error"])
    mean_abs = float(per_d["log error"].abs().mean())
    inside = float(((points["observed"] >= points["low"]) & (points["observed"] <= points["high"])).mean())
    reasons = list(dict.fromkeys(r for p in held_out.predictions for r in p.reasons))
    entry = {
        "held out N": [float(n) for n in held],
        "fit without it": "usable" if not reasons else "not usable: " + "; ".join(reasons),
        "method": f"{held_out.fit.law.formula} by least squares on log q, {len(held_out.fit.samples)} bootstrap "
        f"draws, plus one run's seed noise ({held_out.noise_source}): as the study's targets are predicted",
        "per D": [
            {
                "D": float(r["D"]),
                "observed mean": float(points[points["D"] == r["D"]]["observed"].mean()),
                "predicted": Estimate(r["predicted"], r["low"], r["high"]).to_dict(),
                "law alone": [float(r["fit_low"]), float(r["fit_high"])],
                "log error": float(r["log error"]),
                "z (seed SE)": float(r["z"]),
            }
            for _, r in per_d.iterrows()
        ],
        "mean |log error|": mean_abs,
        "max |z|": float(per_d["z"].abs().max()),
        "seed std of log": spread.std_log if spread else None,
        "observed inside the 95% interval": inside,
        "mean |relative error|": float(np.mean(np.abs(points["predicted"] / points["observed"] - 1))),
    }
    noise = f"the seed spread (std of log {spread.std_log:.3g})" if spread else "no seed spread (one seed)"
    entry["verdict"] = (
        f"mean |log error| {mean_abs:.3g} against {noise}, at most {entry['max |z|']:.2g} seed standard errors; "
        f"{100 * inside:.0f}% of the observed points inside the prediction's 95% interval"
    )
    figs = study.figure(
        figures.prediction_check(points, study.quantity_short, study.d_label, study.n_label),
        "prediction_check",
    )
    return AnalysisResult(entry, held_out, figs)


def targets(study: Study) -> AnalysisResult | None:
    """The study's targets predicted with their 95% predictive intervals (target.py)."""
    s = study.settings
    if not s.targets:
        return None
    goal = [t.counted(s.n_kind, s.d_kind) for t in s.targets]
    predicted = predict_targets(
        study.final, goal, n_bootstrap=s.n_bootstrap, seed=s.seed, trivial=trivial_error(study)
    )
    entry = {
        "law": f"{predicted.fit.law.formula}, fitted by least squares on log q to {predicted.fit.n_points} "
        f"final points ({predicted.fit.n_runs} runs), {len(predicted.fit.samples)} bootstrap draws",
        "seed noise": predicted.noise_source,
        "predictions": [p.to_dict() for p in predicted.predictions],
        "identified": all(p.usable for p in predicted.predictions),
    }
    if not entry["identified"]:
        entry["reason"] = "; ".join(
            f"{p.target.label}: {'; '.join(p.reasons)}" for p in predicted.predictions if p.reasons
        )
    fig = figures.target_prediction(
        study.final, predicted, study.quantity_short, study.n_label, study.d_label
    )
    return AnalysisResult(entry, predicted, study.figure(fig, "targets"))


def trivial_error(study: Study) -> float | None:
    """The error of guessing (1 - 1/classes) when the fitted quantity is a probe's error rate."""
    if study.quantity not in ("probe_linear_error", "probe_knn_error") or "probe_classes" not in study.final:
        return None
    classes = study.final["probe_classes"].dropna()
    return 1 - 1 / float(classes.max()) if len(classes) else None


def _unidentified(params: dict[str, Estimate]) -> str:
    """The names of the parameters a fit leaves unidentified."""
    return ", ".join(name for name, p in params.items() if not p.identified)


def seed_noise(study: Study) -> SeedSpread | None:
    """The seeds' spread of the fitted quantity at equal (N, D): the study's noise floor, against
    which the residuals, the prediction check and the width effect are read (None without seeds)."""
    final = study.final
    if "seed" not in final:
        return None
    return seed_spread(final["N"], final["D"], final["quantity"], final["seed"])


def noise_floor(study: Study) -> AnalysisResult | None:
    final, spread = study.final, seed_noise(study)
    if spread is None:
        return None
    entry = {
        "what": str(spread),
        "std_log": spread.std_log,
        "cells": spread.cells,
        "replicates": spread.replicates,
    }
    effect = width_effect(final["N"], final["D"], final["quantity"], spread)
    if effect is not None:
        entry |= {"width effect": str(effect), "width effect z": effect.z}
    return AnalysisResult(entry, spread)


def candidates(study: Study) -> AnalysisResult | None:
    """Every candidate quantity's noise floor, width effect and monotonicity (quantities.py)."""
    table = quantity_table(study.final, study.evaluations, study.quantity)
    if not len(table):
        return None
    warnings = [
        f"{short_label(row['quantity'])} is {row['flag']}: it improves between "
        f"{_share(row['improves in training'])} of a run's consecutive evaluation points, "
        f"{_share(row['improves with D'])} along D and {_share(row['improves with N'])} along N "
        f"(flagged below {MONOTONE_SHARE:.0%})"
        for _, row in table.iterrows()
        if row["flag"] and row["kind"] == "fitted"
    ]
    records = table.astype(object).where(table.notna(), None).to_dict("records")
    return AnalysisResult({"table": records}, table, warnings=warnings)


def _share(value: float) -> str:
    return f"{value:.0%}" if math.isfinite(value) else "n/a"


def diagnostics(study: Study) -> AnalysisResult | None:
    """The label-free diagnostics against compute, and each one's rank correlation with the fitted
    quantity over the runs (never fitted across widths)."""
    shown = {c: QUANTITIES[c].short for c in DIAGNOSTICS if c in study.evaluations}
    if not shown:
        return None
    correlations = diagnostic_correlations(study.final, study.quantity)
    entry = {
        f"Spearman with {study.quantity}": correlations,
        "what": "rank correlation over the completed runs' final points; diagnostics describe runs and are "
        "not fitted across widths",
    }
    fig = figures.diagnostics_vs_compute(study.evaluations, shown, study.settings.convention)
    return AnalysisResult(entry, correlations, study.figure(fig, "diagnostics"))


def downstream(study: Study, metric: str) -> AnalysisResult:
    done, final, s = study.done, study.final, study.settings
    if metric not in done or not done[metric].notna().any():
        return AnalysisResult(warnings=[f"downstream metric '{metric}' has no values"])
    figs = study.figure(figures.downstream_vs_compute(done, metric, s.convention), f"downstream_{metric}")
    try:
        fit = fit_power_law(
            final["compute"], final[metric], n_bootstrap=s.n_bootstrap, seed=s.seed, quantity_label=metric
        )
    except FitError as exc:
        return AnalysisResult(not_identified(str(exc)), None, figs)
    return AnalysisResult(fit_entry(fit.params()), fit, figs)
