"""``nepa-scale report SWEEP_DIR``: table, fits with intervals, conventions, figures, warnings.

Writes ``<out>/report.html`` (self-contained: figures embedded), ``<out>/report.md``,
``<out>/fits.json``, ``<out>/figures/*.png|svg`` and the tidy table.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.eval.transfer import TRANSFER_FILE, transfer_lines
from nepa_scale.scaling import figures
from nepa_scale.scaling.collect import DEFAULT_WINDOW, collect, collect_curves, write_table
from nepa_scale.scaling.fits import (
    MAX_INTERVAL_RATIO,
    Estimate,
    FitError,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    holdout,
    human,
    pareto_frontier,
    seed_spread,
    width_effect,
)

log = logging.getLogger(__name__)

QUANTITIES = {
    "cosine_distance": "mean cosine distance 1 + loss (training, smoothed)",
    "val_cosine_distance": "held-out mean cosine distance 1 + val_loss",
    "seg_error": "segmentation error 1 - mIoU (val, single scale) of the attached fine-tunes",
    "miou": "mIoU (val, single scale) of the attached segmentation fine-tunes",
}
N_KINDS = {"params": "total parameters", "params_no_embed": "parameters without patch embedding"}
D_KINDS = {"images": "images seen", "patches": "patches seen (images x patches per image)"}


@dataclass
class StudySettings:
    # auto: the held-out 1 + val_loss when every completed run measured it, else 1 + training loss;
    # or any positive column of the table (e.g. a probe error)
    quantity: str = "auto"
    n_kind: str = "params"
    d_kind: str = "images"
    convention: str = "6N+attn"
    budgets: list[float] | None = None  # extra table rows at these training FLOPs (mid-run points)
    window: int = DEFAULT_WINDOW
    n_bootstrap: int = 1000
    seed: int = 0
    holdout_largest: int = 1
    downstream: list[str] = field(default_factory=list)
    # FLOPs where the frontier fit starts; None: the end of the initial loss plateau (PLATEAU_DROP)
    frontier_from: float | None = None

    @property
    def quantity_label(self) -> str:
        return QUANTITIES.get(self.quantity, self.quantity)


# Before learning starts the loss sits on a plateau near its initial value, which no power law in
# compute describes. The frontier fit starts where the frontier has covered this fraction of its
# total drop.
PLATEAU_DROP = 0.1


def resolve_quantity(final: pd.DataFrame, s: StudySettings) -> StudySettings:
    """``quantity: auto`` -> the held-out quantity when every completed run has it."""
    if s.quantity != "auto":
        return s
    held_out = "val_cosine_distance" in final and len(final) and final["val_cosine_distance"].notna().all()
    return dataclasses.replace(s, quantity="val_cosine_distance" if held_out else "cosine_distance")


def fit_table(table: pd.DataFrame, s: StudySettings) -> pd.DataFrame:
    """Add the columns the fits use: N, D, compute, quantity (named in the settings)."""
    s = resolve_quantity(table[table["eval_point"] == "final"] if "eval_point" in table else table, s)
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


def frontier_start(frontier: pd.DataFrame) -> float:
    """The FLOPs where the frontier has covered PLATEAU_DROP of its drop (the plateau's end)."""
    q = frontier["cosine_distance"].to_numpy()
    reached = q <= q[0] - PLATEAU_DROP * (q[0] - q.min())
    return (
        float(frontier["flops"].to_numpy()[reached.argmax()])
        if reached.any()
        else float(frontier["flops"].min())
    )


def not_identified(reason: str) -> dict:
    return {"identified": False, "reason": reason}


def fit_entry(params: dict[str, Estimate], **facts) -> dict:
    """A fit as fits.json holds it: numbers, intervals, and whether each parameter is identified."""
    reasons = [f"{name}: {p.reason}" for name, p in params.items() if not p.identified]
    entry = {"identified": not reasons, "params": {k: v.to_dict() for k, v in params.items()}, **facts}
    if reasons:
        entry["reason"] = "; ".join(reasons)
    return entry


def read_fits(path: str | Path) -> dict:
    """fits.json with every parameter back as an ``Estimate``."""
    data = json.loads(Path(path).read_text())
    for entry in data["fits"].values():
        if "params" in entry:
            entry["params"] = {k: Estimate.from_dict(v) for k, v in entry["params"].items()}
    return data


def describe(entry: dict) -> str:
    """One line for people: each parameter as a number with its interval, or why it is not identified."""
    if "params" not in entry:
        if not entry.get("identified", True):
            return f"not identified ({entry['reason']})"
        return ", ".join(f"{k} = {_display(v)}" for k, v in entry.items() if k != "identified")
    params = entry["params"]
    shown = [f"{k} = {p if isinstance(p, Estimate) else Estimate.from_dict(p)}" for k, p in params.items()]
    return "; ".join(shown)


def _display(value) -> str:
    if isinstance(value, Estimate):
        return str(value)
    if isinstance(value, dict) and "value" in value and "identified" in value:
        return str(Estimate.from_dict(value))
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float | np.floating | np.integer):
        return human(value)
    if isinstance(value, list):
        return "; ".join(_display(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_display(v)}" for k, v in value.items())
    return str(value)


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
    completed = table[table["status"] == "completed"]
    s = resolve_quantity(completed[completed["eval_point"] == "final"], s)
    done = fit_table(completed, s)
    # Only a run's end is the loss of a run of that length: a mid-run point of a decaying schedule
    # is not (WSD branches are runs of their own, with their own ends).
    final = done[done["eval_point"] == "final"]
    if s.budgets:
        warnings.append(
            "--budgets rows are mid-run points: they are in the table and the loss curves, never in the "
            "(N, D) or IsoFLOP fits (those take each run's final point; design IsoFLOP runs or WSD branches)"
        )
    results: dict = {"settings": s.__dict__, "fits": {}}
    figs: dict[str, Path] = {}
    objects: dict = {}

    frontier_fit, frontier = None, None
    if len(curves):
        frontier = curves.iloc[pareto_frontier(curves["flops"], curves["cosine_distance"])]
        start = s.frontier_from if s.frontier_from is not None else frontier_start(frontier)
        fitted = frontier[frontier["flops"] >= start]
        facts = {
            "quantity": QUANTITIES["cosine_distance"]
            + ", from the loss curves (mid-run points are fair here)",
            "starts at FLOPs": start,
            "points": len(fitted),
        }
        if fitted["params"].nunique() < 2:
            results["fits"]["frontier"] = (
                not_identified(
                    f"the frontier past {human(start)} FLOPs holds {fitted['params'].nunique()} model size(s): it is "
                    "one model's loss curve, not a law in compute"
                )
                | facts
            )
        else:
            try:
                frontier_fit = fit_power_law(
                    fitted["flops"],
                    fitted["cosine_distance"],
                    n_bootstrap=s.n_bootstrap,
                    seed=s.seed,
                    x_label=f"FLOPs ({s.convention})",
                    quantity_label=QUANTITIES["cosine_distance"],
                )
                warnings += [f"frontier: {w}" for w in frontier_fit.warnings]
                results["fits"]["frontier"] = fit_entry(frontier_fit.params(), **facts)
            except FitError as exc:
                results["fits"]["frontier"] = not_identified(str(exc)) | facts
        figs["loss_curves"] = figures.save(
            figures.loss_curves(
                curves, frontier, frontier_fit, QUANTITIES["cosine_distance"], s.convention, start
            ),
            fig_dir,
            "loss_curves",
        )["png"]
    objects["frontier"] = frontier_fit

    seeds = final["seed"] if "seed" in final else None
    chinchilla = None
    try:
        chinchilla = fit_chinchilla(
            final["N"],
            final["D"],
            final["quantity"],
            final["run_id"],
            replicates=seeds,
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            n_label=N_KINDS[s.n_kind],
            d_label=D_KINDS[s.d_kind],
            quantity_label=s.quantity_label,
        )
        warnings += [f"Chinchilla: {w}" for w in chinchilla.warnings]
        results["fits"]["chinchilla"] = fit_entry(
            chinchilla.params,
            quantity=s.quantity_label,
            points=chinchilla.n_points,
            resampled_units=chinchilla.n_runs,
            bootstrap=chinchilla.n_bootstrap,
        )
        figs["residuals"] = figures.save(
            figures.residuals(final, chinchilla, D_KINDS[s.d_kind], N_KINDS[s.n_kind]), fig_dir, "residuals"
        )["png"]
    except FitError as exc:
        results["fits"]["chinchilla"] = not_identified(str(exc))
    objects["chinchilla"] = chinchilla

    iso_rows = final[final["flops_budget"].notna()] if "flops_budget" in final else final.iloc[:0]
    iso = None
    if len(iso_rows):
        try:
            iso = fit_isoflop(
                iso_rows["flops_budget"],
                iso_rows["N"],
                iso_rows["D"],
                iso_rows["quantity"],
                iso_rows["run_id"],
                n_bootstrap=s.n_bootstrap,
                seed=s.seed,
            )
            warnings += [f"IsoFLOP: {w}" for w in iso.warnings]
            results["fits"]["isoflop"] = fit_entry(
                {"N_opt exponent": iso.n_exponent, "D_opt exponent": iso.d_exponent},
                minima=[
                    {"C": float(c), "N_opt": m.to_dict(), "D_opt": float(d)}
                    for c, m, d in zip(iso.budgets, iso.minima, iso.d_opt, strict=True)
                ],
            )
            figs["isoflop"] = figures.save(
                figures.isoflop_curves(
                    iso_rows.assign(compute=iso_rows["flops_budget"]),
                    iso,
                    s.quantity_label,
                    N_KINDS[s.n_kind],
                ),
                fig_dir,
                "isoflop",
            )["png"]
            figs["n_opt"] = figures.save(
                figures.n_opt_vs_compute(iso, N_KINDS[s.n_kind], s.convention), fig_dir, "n_opt"
            )["png"]
        except FitError as exc:
            results["fits"]["isoflop"] = not_identified(str(exc))
    objects["isoflop"] = iso
    if len(final):
        figs["loss_vs_params"] = figures.save(
            figures.loss_vs_params(final, chinchilla, s.quantity_label, N_KINDS[s.n_kind], D_KINDS[s.d_kind]),
            fig_dir,
            "loss_vs_params",
        )["png"]
    for metric in s.downstream:
        if metric in done and done[metric].notna().any():
            figs[f"downstream_{metric}"] = figures.save(
                figures.downstream_vs_compute(done, metric, s.convention), fig_dir, f"downstream_{metric}"
            )["png"]
            try:
                f = fit_power_law(
                    final["compute"],
                    final[metric],
                    n_bootstrap=s.n_bootstrap,
                    seed=s.seed,
                    quantity_label=metric,
                )
                results["fits"][f"downstream_{metric}"] = fit_entry(f.params())
            except FitError as exc:
                results["fits"][f"downstream_{metric}"] = not_identified(str(exc))
        else:
            warnings.append(f"downstream metric '{metric}' has no values")
    if s.holdout_largest and chinchilla is not None:
        try:
            ho = holdout(
                final["N"],
                final["D"],
                final["quantity"],
                final["run_id"],
                largest=s.holdout_largest,
                n_bootstrap=0,
                seed=s.seed,
            )
            results["fits"]["holdout"] = {
                "held out N": [float(n) for n in ho.held_out_sizes],
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
            effect = width_effect(final["N"], final["D"], final["quantity"], spread)
            if effect is not None:
                results["fits"]["noise floor (seeds)"] |= {
                    "width effect": str(effect),
                    "width effect z": effect.z,
                }
    transfer_file = sweep_dir / TRANSFER_FILE
    if transfer_file.is_file():  # written by the demo's transfer step (nepa_scale/eval/transfer.py)
        results["transfer"] = transfer_lines(json.loads(transfer_file.read_text()))
    for name, entry in results["fits"].items():
        if not entry.get("identified", True):
            warnings.insert(0, f"{name}: not identified: {entry['reason']}")
    results["warnings"] = warnings
    results["conventions"] = {
        "FLOPs": f"{s.convention} (nepa_scale/flops.py: training = 3 x forward)",
        "N": N_KINDS[s.n_kind],
        "D": D_KINDS[s.d_kind],
        "fitted quantity": s.quantity_label,
        "loss smoothing": f"mean of the last {s.window} logged training losses",
        "intervals": f"95% percentile bootstrap: seeds drawn whole, then runs within each seed (a run's "
        f"points together), {s.n_bootstrap} resamples, seed {s.seed}",
        "not identified": f"a parameter at a bound of its search, or whose 95% interval spans more than a "
        f"factor of {MAX_INTERVAL_RATIO:g} or has zero width",
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
    results["objects"] = objects
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


def _fit_rows(entry: dict) -> dict:
    """A fit's lines for people: its parameters (or why it is not identified), then its facts."""
    rows = {}
    if not entry.get("identified", True) and "params" not in entry:
        rows["result"] = f"not identified ({entry['reason']})"
    for name, value in entry.get("params", {}).items():
        rows[name] = _display(value)
    for name, value in entry.items():
        if name not in ("params", "identified", "reason"):
            rows[name] = _display(value)
    return rows


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
        "<h2>Warnings</h2>"
        + (
            "<ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in results["warnings"]) + "</ul>"
            if results["warnings"]
            else "<p>none</p>"
        ),
        "<h2>Figures</h2>" + "".join(_fig_html(p) for p in figs.values()),
        "<h2>Fits</h2>",
    ]
    for name, fit in results["fits"].items():
        parts += [f"<h3>{html.escape(name)}</h3><table>", rows(_fit_rows(fit)), "</table>"]
    if results.get("transfer"):
        parts.append(
            "<h2>Transfer</h2><ul>"
            + "".join(f"<li>{html.escape(t)}</li>" for t in results["transfer"])
            + "</ul>"
        )
    parts += ["<h2>Conventions</h2><table>", rows(results["conventions"]), "</table>"]
    parts.append(
        "<h2>Runs</h2>" + _run_table(table).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="")
    )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def _write_markdown(out: Path, table: pd.DataFrame, results: dict, figs: dict[str, Path]) -> None:
    lines = ["# Scaling report", "", "## Warnings", ""]
    lines += [f"- {w}" for w in results["warnings"]] or ["none"]
    lines += ["", "## Figures", ""] + [f"![{name}](figures/{p.name})" for name, p in figs.items()]
    lines += ["", "## Fits", ""]
    for name, fit in results["fits"].items():
        lines += [f"### {name}", ""] + [f"- {k}: {v}" for k, v in _fit_rows(fit).items()] + [""]
    if results.get("transfer"):
        lines += ["## Transfer", ""] + [f"- {t}" for t in results["transfer"]] + [""]
    lines += ["## Conventions", ""] + [f"- **{k}**: {v}" for k, v in results["conventions"].items()]
    lines += [
        "",
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


__all__ = ["StudySettings", "build_report", "describe", "fit_table", "read_fits"]
