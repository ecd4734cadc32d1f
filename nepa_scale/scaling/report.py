"""``nepa-scale report SWEEP_DIR``: table, fits with intervals, conventions, figures, warnings.

Writes ``<out>/report.html`` (self-contained: figures embedded), ``<out>/report.md``,
``<out>/fits.json``, ``<out>/figures/*.png|svg`` and the tidy table.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nepa_scale.scaling import figures
from nepa_scale.scaling.collect import DEFAULT_WINDOW, collect, collect_curves, write_table
from nepa_scale.scaling.fits import (
    FitError,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    holdout,
    pareto_frontier,
    seed_spread,
)

log = logging.getLogger(__name__)

QUANTITIES = {
    "cosine_distance": "mean cosine distance 1 + loss (training, smoothed)",
    "val_cosine_distance": "held-out mean cosine distance 1 + val_loss",
}
N_KINDS = {"params": "total parameters", "params_no_embed": "parameters without patch embedding"}
D_KINDS = {"images": "images seen", "patches": "patches seen (images x patches per image)"}


@dataclass
class StudySettings:
    quantity: str = "cosine_distance"  # any positive column of the table (e.g. a probe error)
    n_kind: str = "params"
    d_kind: str = "images"
    convention: str = "6N+attn"
    budgets: list[float] | None = None  # pre-registered compute budgets (FLOPs) for IsoFLOP
    window: int = DEFAULT_WINDOW
    n_bootstrap: int = 1000
    seed: int = 0
    holdout_largest: int = 1
    downstream: list[str] = field(default_factory=list)

    @property
    def quantity_label(self) -> str:
        return QUANTITIES.get(self.quantity, self.quantity)


def fit_table(table: pd.DataFrame, s: StudySettings) -> pd.DataFrame:
    """Add the columns the fits use: N, D, compute, quantity (named in the settings)."""
    if s.quantity not in table:
        raise FitError(
            f"quantity '{s.quantity}' is not a column of the table (have: {', '.join(table.columns)})"
        )
    out = table.copy()
    out["N"] = out[s.n_kind]
    out["D"] = out["images_seen"] * ((out["tokens_per_image"] - 1) if s.d_kind == "patches" else 1)
    out["compute"] = out[f"flops_{s.convention}"]
    out["quantity"] = out[s.quantity]
    return out


def _fig_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img src="data:image/png;base64,{data}" alt="{path.stem}"><figcaption>{path.stem}</figcaption></figure>'


def build_report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, settings: StudySettings | None = None
) -> dict:
    s = settings or StudySettings()
    if s.n_kind not in N_KINDS or s.d_kind not in D_KINDS:
        raise ValueError(f"n_kind must be one of {list(N_KINDS)} and d_kind one of {list(D_KINDS)}")
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "report"
    fig_dir = out / "figures"
    warnings: list[str] = []
    table = collect(sweep_dir, budgets=s.budgets, window=s.window, convention=s.convention)
    curves = collect_curves(sweep_dir, window=s.window, convention=s.convention)
    write_table(table, out)
    bad = table[table["status"] != "completed"]
    for _, row in bad.drop_duplicates("run_id").iterrows():
        warnings.append(
            f"run {row['run_id']} is {row['status']}"
            + (f": {row['error']}" if isinstance(row.get("error"), str) else "")
            + " (kept in the table, left out of the fits)"
        )
    done = fit_table(table[table["status"] == "completed"], s)
    results: dict = {"settings": s.__dict__, "fits": {}}
    figs: dict[str, Path] = {}

    frontier_fit, frontier = None, None
    if len(curves):
        idx = pareto_frontier(curves["flops"], curves["cosine_distance"])
        frontier = curves.iloc[idx]
        try:
            frontier_fit = fit_power_law(
                frontier["flops"],
                frontier["cosine_distance"],
                n_bootstrap=s.n_bootstrap,
                seed=s.seed,
                x_label=f"FLOPs ({s.convention})",
                quantity_label=QUANTITIES["cosine_distance"],
            )
            warnings += [f"frontier: {w}" for w in frontier_fit.warnings]
            results["fits"]["frontier"] = {k: str(getattr(frontier_fit, k)) for k in ("E", "A", "alpha")}
        except FitError as exc:
            warnings.append(f"frontier fit skipped: {exc}")
        figs["loss_curves"] = figures.save(
            figures.loss_curves(curves, frontier, frontier_fit, QUANTITIES["cosine_distance"], s.convention),
            fig_dir,
            "loss_curves",
        )["png"]

    final = done[done["eval_point"] == "final"]
    fit_rows = final if not s.budgets else done
    chinchilla = None
    try:
        chinchilla = fit_chinchilla(
            fit_rows["N"],
            fit_rows["D"],
            fit_rows["quantity"],
            fit_rows["trunk"] if "trunk" in fit_rows else fit_rows["run_id"],
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            n_label=N_KINDS[s.n_kind],
            d_label=D_KINDS[s.d_kind],
            quantity_label=s.quantity_label,
        )
        warnings += [f"Chinchilla: {w}" for w in chinchilla.warnings]
        results["fits"]["chinchilla"] = {k: str(v) for k, v in chinchilla.params.items()} | {
            "points": chinchilla.n_points,
            "runs": chinchilla.n_runs,
            "bootstrap": chinchilla.n_bootstrap,
        }
        figs["residuals"] = figures.save(
            figures.residuals(fit_rows, chinchilla, D_KINDS[s.d_kind], N_KINDS[s.n_kind]),
            fig_dir,
            "residuals",
        )["png"]
    except FitError as exc:
        warnings.append(f"Chinchilla fit skipped: {exc}")

    if s.budgets:
        iso_rows = done[done["eval_point"] != "final"]
        try:
            iso = fit_isoflop(
                iso_rows["compute"],
                iso_rows["N"],
                iso_rows["D"],
                iso_rows["quantity"],
                iso_rows["run_id"],
                n_bootstrap=s.n_bootstrap,
                seed=s.seed,
            )
            warnings += [f"IsoFLOP: {w}" for w in iso.warnings]
            results["fits"]["isoflop"] = {
                "N_opt exponent": str(iso.n_exponent),
                "D_opt exponent": str(iso.d_exponent),
                "minima": [
                    {"C": float(c), "N_opt": float(n), "D_opt": float(d)}
                    for c, n, d in zip(iso.budgets, iso.n_opt, iso.d_opt, strict=True)
                ],
            }
            figs["isoflop"] = figures.save(
                figures.isoflop_curves(iso_rows, iso, s.quantity_label, N_KINDS[s.n_kind]), fig_dir, "isoflop"
            )["png"]
            figs["n_opt"] = figures.save(
                figures.n_opt_vs_compute(iso, N_KINDS[s.n_kind], s.convention), fig_dir, "n_opt"
            )["png"]
        except FitError as exc:
            warnings.append(f"IsoFLOP fit skipped: {exc}")
    if len(done):
        figs["loss_vs_params"] = figures.save(
            figures.loss_vs_params(done, s.quantity_label, N_KINDS[s.n_kind]), fig_dir, "loss_vs_params"
        )["png"]
    for metric in s.downstream:
        if metric in done and done[metric].notna().any():
            figs[f"downstream_{metric}"] = figures.save(
                figures.downstream_vs_compute(done, metric, s.convention), fig_dir, f"downstream_{metric}"
            )["png"]
            try:
                f = fit_power_law(
                    done["compute"],
                    done[metric],
                    n_bootstrap=s.n_bootstrap,
                    seed=s.seed,
                    quantity_label=metric,
                )
                results["fits"][f"downstream_{metric}"] = {k: str(getattr(f, k)) for k in ("E", "A", "alpha")}
            except FitError as exc:
                warnings.append(f"downstream {metric} fit skipped: {exc}")
        else:
            warnings.append(f"downstream metric '{metric}' has no values")
    if s.holdout_largest and chinchilla is not None:
        try:
            ho = holdout(
                fit_rows["N"],
                fit_rows["D"],
                fit_rows["quantity"],
                fit_rows["run_id"],
                largest=s.holdout_largest,
                n_bootstrap=0,
                seed=s.seed,
            )
            results["fits"]["holdout"] = {
                "held out N": ho.held_out_sizes,
                "mean |relative error|": ho.mean_abs_rel_error,
            }
        except FitError as exc:
            warnings.append(f"hold-out skipped: {exc}")

    if "seed" in final:
        spread = seed_spread(final["N"], final["D"], final["quantity"], final["seed"])
        if spread is not None:
            results["fits"]["noise floor (seeds)"] = {
                "what": str(spread),
                "std_log": spread.std_log,
                "cells": spread.cells,
                "replicates": spread.replicates,
            }
    results["warnings"] = warnings
    results["conventions"] = {
        "FLOPs": f"{s.convention} (nepa_scale/flops.py: training = 3 x forward)",
        "N": N_KINDS[s.n_kind],
        "D": D_KINDS[s.d_kind],
        "fitted quantity": s.quantity_label,
        "loss smoothing": f"mean of the last {s.window} logged training losses",
        "intervals": f"95% percentile bootstrap over runs (a WSD trunk and its branches resampled together; "
        f"each seed its own), {s.n_bootstrap} resamples, seed {s.seed}",
    }
    (out / "fits.json").write_text(json.dumps(results, indent=2, default=str))
    _write_html(out, table, results, figs)
    _write_markdown(out, table, results, figs)
    results["paths"] = {
        "html": out / "report.html",
        "markdown": out / "report.md",
        "figures": figs,
        "table": out / "table.parquet",
    }
    results["objects"] = {"frontier": frontier_fit, "chinchilla": chinchilla}
    return results


RUN_COLUMNS = [
    "run_id",
    "model",
    "seed",
    "params",
    "params_no_embed",
    "eval_point",
    "images_seen",
    "flops_6N+attn",
    "loss",
    "cosine_distance",
    "val_loss",
    "gpu_hours",
    "restarts",
    "status",
]


def _run_table(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in RUN_COLUMNS if c in table]
    return table[cols].sort_values(["params", "run_id", "eval_point"]) if "params" in table else table[cols]


def _write_html(out: Path, table: pd.DataFrame, results: dict, figs: dict[str, Path]) -> None:
    def rows(d: dict) -> str:
        return "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items()
        )

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>nepa-scale report</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{max-width:520px}figure{display:inline-block}"
        ".warn{color:#a40}",
        "</style></head><body><h1>Scaling report</h1>",
        "<h2>Conventions</h2><table>",
        rows(results["conventions"]),
        "</table>",
        "<h2>Fits</h2>",
    ]
    for name, fit in results["fits"].items():
        parts += [f"<h3>{html.escape(name)}</h3><table>", rows(fit), "</table>"]
    parts.append(
        "<h2>Warnings</h2>"
        + (
            "<ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in results["warnings"]) + "</ul>"
            if results["warnings"]
            else "<p>none</p>"
        )
    )
    parts.append("<h2>Figures</h2>" + "".join(_fig_html(p) for p in figs.values()))
    parts.append(
        "<h2>Runs</h2>" + _run_table(table).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")
    )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def _write_markdown(out: Path, table: pd.DataFrame, results: dict, figs: dict[str, Path]) -> None:
    lines = ["# Scaling report", "", "## Conventions", ""]
    lines += [f"- **{k}**: {v}" for k, v in results["conventions"].items()]
    lines += ["", "## Fits", ""]
    for name, fit in results["fits"].items():
        lines += [f"### {name}", ""] + [f"- {k}: {v}" for k, v in fit.items()] + [""]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in results["warnings"]] or ["none"]) + [""]
    lines += ["## Figures", ""] + [f"![{name}](figures/{p.name})" for name, p in figs.items()] + [""]
    lines += [
        "## Runs",
        "",
        _run_table(table).to_markdown(index=False, floatfmt=".4g")
        if _has_tabulate()
        else _run_table(table).to_string(index=False),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["StudySettings", "build_report", "fit_table"]
