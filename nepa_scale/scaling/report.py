"""``nepa-scale report SWEEP_DIR``: the fitted quantity, fits with intervals, checks, figures, warnings.

``build_report`` collects the runs, resolves the quantity a NEPA study fits (a downstream error by
default: scaling/quantities.py says why), runs the analyses of scaling/analyses.py one by one and
returns a typed ``Report``, which scaling/render.py writes as ``report.html`` (self-contained:
figures embedded) and ``report.md``. Beside them: ``fits.json``, ``figures/*.png|svg`` and the tidy
table.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.config.files import check_output_folder
from nepa_scale.scaling import analyses
from nepa_scale.scaling.analyses import AnalysisResult, run_step
from nepa_scale.scaling.collect import (
    collect,
    collect_curves,
    collect_evaluations,
    unreadable_line_warnings,
    write_table,
)
from nepa_scale.scaling.comparable import incomparable_runs, preferred_but_rare, runs_without
from nepa_scale.scaling.fits import MAX_INTERVAL_RATIO, Estimate, FitError, human
from nepa_scale.scaling.quantities import label, resolve_quantity
from nepa_scale.scaling.render import FIT_TITLES, as_estimate, describe, write_html, write_markdown
from nepa_scale.scaling.study import D_KINDS, N_KINDS, Report, Study, StudySettings
from nepa_scale.scaling.target import read_study_record
from nepa_scale.scaling.transfer_record import TransferRecord


def fit_table(table: pd.DataFrame, s: StudySettings, quantity: str | None = None) -> pd.DataFrame:
    """Add the columns the fits use: N, D, compute, quantity (``quantity``, or the settings')."""
    quantity = quantity or s.quantity
    if quantity == "auto":
        final = table[table["eval_point"] == "final"] if "eval_point" in table else table
        quantity = resolve_quantity(final, "auto")[0]
    if quantity not in table:
        raise FitError(
            f"quantity '{quantity}' is not a column of the table (have: {', '.join(table.columns)})"
        )
    out = table.copy()
    out["N"] = out[s.n_kind]
    out["D"] = out["images_seen"] * ((out["tokens_per_image"] - 1) if s.d_kind == "patches" else 1)
    out["compute"] = out[f"flops_{s.convention}"]
    out["quantity"] = out[quantity]
    return out


def read_fits(path: str | Path) -> dict:
    """fits.json with every parameter back as an ``Estimate``."""
    data = json.loads(Path(path).read_text())
    for entry in data["fits"].values():
        if "params" in entry:
            entry["params"] = {k: Estimate.from_dict(v) for k, v in entry["params"].items()}
    return data


def load_study(sweep_dir: Path, out: Path | None, s: StudySettings) -> tuple[pd.DataFrame, Study, list[str]]:
    """Collect the runs, set aside those no fit may take (comparable.py: each named), resolve the
    fitted quantity: the table (its ``left_out`` column says why a run is not in the fits; written to
    ``out``, if given), the study, and the warnings so far."""
    table = collect(sweep_dir, budgets=s.budgets, window=s.window, convention=s.convention)
    warnings = [
        f"run {row['run_id']} is {row['status']}"
        + (f": {row['error']}" if isinstance(row.get("error"), str) else "")
        + " (kept in the table, left out of the fits)"
        for _, row in table[table["status"] != "completed"].drop_duplicates("run_id").iterrows()
    ]
    warnings += unreadable_line_warnings(table)
    left_out, why = incomparable_runs(table)
    warnings += why
    completed = table[(table["status"] == "completed") & ~table["run_id"].isin(left_out)]
    final = completed[completed["eval_point"] == "final"]
    quantity, why = resolve_quantity(final, s.quantity)
    warnings += why + (preferred_but_rare(final, quantity) if s.quantity == "auto" else [])
    without, why = runs_without(final, quantity)
    warnings += why
    left_out |= dict.fromkeys(without, f"no comparable {quantity}")
    done = fit_table(completed[~completed["run_id"].isin(without)], s, quantity)
    final = done[done["eval_point"] == "final"]
    unusable = final[~np.isfinite(final["quantity"].astype(float)) | (final["quantity"] <= 0)]
    warnings += [
        f"run {row['run_id']}: its {quantity} is {row['quantity']} (not a positive number): left out of the fits"
        for _, row in unusable.iterrows()
    ]
    subsets = done["probe_subsets"].dropna().unique() if "probe_subsets" in done else []
    if len(subsets) > 1:
        warnings.append(
            f"the runs probed {len(subsets)} different image subsets ({'; '.join(subsets)}): their probe "
            "errors are not measured on the same images"
        )
    if s.budgets:
        warnings.append(
            "--budgets rows are mid-run points: they are in the table and the loss curves, never in the "
            "(N, D) or IsoFLOP fits (those take each run's final point; design IsoFLOP runs or WSD branches)"
        )
    table["left_out"] = table["run_id"].map(left_out)
    if out is not None:
        write_table(table, out)
    curves = collect_curves(sweep_dir, window=s.window, convention=s.convention)
    evaluations = collect_evaluations(sweep_dir, convention=s.convention)
    study = Study(
        s,
        quantity,
        done,
        final,
        curves[~curves["run_id"].isin(left_out)] if len(curves) else curves,
        evaluations[~evaluations["run_id"].isin(left_out)] if len(evaluations) else evaluations,
        out / "figures" if out is not None else Path(sweep_dir) / "report" / "figures",
    )
    return table, study, warnings


def _analyses(study: Study) -> dict[str, AnalysisResult]:
    """Every analysis, in the order the report shows them (only those that apply)."""
    results: dict[str, AnalysisResult | None] = {
        "targets": run_step(analyses.targets, study),
        "frontier": run_step(analyses.frontier, study),
        "chinchilla": run_step(analyses.chinchilla, study),
    }
    results["isoflop"] = run_step(analyses.isoflop, study)
    results["loss vs params"] = analyses.loss_vs_params(study, results["chinchilla"].fit)
    results["prediction check"] = run_step(analyses.prediction, study)
    results["noise floor (seeds)"] = run_step(analyses.noise_floor, study)
    results["quantities"] = run_step(analyses.candidates, study)
    results["diagnostics"] = run_step(analyses.diagnostics, study)
    for metric in study.settings.downstream:
        results[f"downstream_{metric}"] = analyses.downstream(study, metric)
    return {name: result for name, result in results.items() if result is not None}


def summary_lines(study: Study, results: dict[str, AnalysisResult]) -> list[str]:
    """What the study shows, before any warning or figure: the fitted quantity and the axes, what
    each law identifies (and what it does not), the noise floor, the prediction check."""
    s = study.settings
    lines = target_lines(study, results.get("targets"))
    lines += [
        f"Fitted quantity: {study.quantity_label} ({study.quantity}), the final point of each of "
        f"{len(study.final)} completed runs. N = {study.n_label}, D = {study.d_label}, C = training FLOPs "
        f"({s.convention}). In brackets: 95% bootstrap intervals ({s.n_bootstrap} resamples)."
    ]
    for name in ("frontier", "chinchilla"):
        if name in results and results[name].entry is not None:
            lines.append(f"{FIT_TITLES[name]}: {identified_in_words(results[name].entry)}.")
    noise = results.get("noise floor (seeds)")
    if noise is not None and noise.entry and "what" in noise.entry:
        lines.append(f"Noise floor: {noise.entry['what']}.")
        if "width effect" in noise.entry:
            lines.append(f"Width: {noise.entry['width effect']}.")
    check = results.get("prediction check")
    if check is not None and check.entry and "verdict" in check.entry:
        held = ", ".join(human(n) for n in check.entry["held out N"])
        lines.append(
            f"Prediction check (N = {held} held out, predicted at every D): {check.entry['verdict']}."
        )
    return lines


def target_lines(study: Study, result: AnalysisResult | None) -> list[str]:
    """The summary's first lines: each target's predicted quantity, its 95% predictive interval,
    its cost, and whether it can be relied on (and why not)."""
    if result is None:
        return []
    if result.fit is None:
        return [f"Targets: no prediction ({result.entry['reason']})."]
    lines = [f"Target: {p.line(study.quantity_short)}." for p in result.fit.predictions]
    return lines + [f"(The targets' law: {result.entry['law']}; seed noise: {result.entry['seed noise']}.)"]


def identified_in_words(entry: dict) -> str:
    """A law's identified parameters with their intervals, then the names of those it leaves
    unidentified (the warnings say why): the summary never hides a half-identified law."""
    if "params" not in entry:
        return f"not identified ({entry['reason']})"
    params = {name: as_estimate(p) for name, p in entry["params"].items()}
    shown = [f"{name} = {p}" for name, p in params.items() if p.identified]
    missing = [name for name, p in params.items() if not p.identified]
    if missing:
        names = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        shown.append(f"{names} not identified (see Warnings)")
    return "; ".join(shown)


def build_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, settings: StudySettings | None = None
) -> Report:
    s = settings or StudySettings()
    if s.n_kind not in N_KINDS or s.d_kind not in D_KINDS:
        raise ValueError(f"n_kind must be one of {list(N_KINDS)} and d_kind one of {list(D_KINDS)}")
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    if s.targets is None:
        s = replace(s, targets=read_study_record(sweep_dir).get("targets", []))
    check_output_folder(out, "--out" if out_dir else "report folder")
    table, study, warnings = load_study(sweep_dir, out, s)
    results = _analyses(study)
    first = [  # what is not identified leads, in the order of the analyses
        f"{name}: not identified: {r.entry['reason']}"
        for name, r in results.items()
        if r.entry is not None and not r.entry.get("identified", True)
    ]
    warnings = first + warnings + [w for r in results.values() for w in r.warnings]
    transfer = TransferRecord.read(sweep_dir)  # written by the demo's transfer step
    report = Report(
        settings=s,
        quantity=study.quantity,
        table=table,
        analyses=results,
        warnings=warnings,
        conventions=conventions(s, study.quantity),
        summary=summary_lines(study, results),
        transfer=transfer.lines() if transfer is not None else [],
    )
    (out / "fits.json").write_text(json.dumps(report.to_json(), indent=2, default=_json_number))
    report.paths = {
        "html": write_html(out, report),
        "markdown": write_markdown(out, report),
        "table": out / "table.parquet",
    }
    return report


def _json_number(value):
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return str(value)


def conventions(s: StudySettings, quantity: str) -> dict[str, str]:
    return {
        "FLOPs": f"{s.convention} (nepa_scale/flops.py: training = 3 x forward)",
        "N": N_KINDS[s.n_kind],
        "D": D_KINDS[s.d_kind],
        "fitted quantity": f"{label(quantity)} ({quantity})",
        "loss smoothing": f"mean of the last {s.window} logged training losses",
        "intervals": f"95% percentile bootstrap: seeds drawn whole, then runs within each seed (a run's "
        f"points together), {s.n_bootstrap} resamples, seed {s.seed}",
        "not identified": f"a parameter at a bound of its search, or whose 95% interval spans more than a "
        f"factor of {MAX_INTERVAL_RATIO:g} or has zero width",
    }


def study_points(sweep_dir: str | Path, s: StudySettings) -> tuple[Study, float | None, list[str]]:
    """The study the advisor fits (its completed runs' final points), the trivial error of its
    quantity, and the warnings of reading it; nothing is written."""
    _, study, warnings = load_study(Path(sweep_dir), None, s)
    return study, analyses.trivial_error(study), warnings


__all__ = [
    "Report",
    "StudySettings",
    "build_report",
    "describe",
    "fit_table",
    "load_study",
    "read_fits",
    "study_points",
]
