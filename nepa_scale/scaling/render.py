"""A ``Report`` for people: ``report.html`` (self-contained, figures embedded) and ``report.md``.

Both open with what the study shows (the fitted quantity, what is identified, the noise floor, the
prediction check), then warnings, figures, the fits, how each candidate quantity behaves, transfer,
conventions and the run table.
"""

from __future__ import annotations

import base64
import html
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.scaling.fits import Estimate, human
from nepa_scale.scaling.quantities import label, short_label
from nepa_scale.scaling.study import Report

# The run table's columns as people read them (the flops column is added for the study's convention).
RUN_COLUMNS = {
    "run_id": "run",
    "model": "model",
    "seed": "seed",
    "params": "N (total parameters)",
    "params_no_embed": "parameters without patch embedding",
    "eval_point": "point",
    "images_seen": "images seen",
    "loss": "NEPA loss (training, smoothed)",
    "val_loss": "NEPA loss (held-out)",
    "probe_linear_error": short_label("probe_linear_error"),
    "probe_knn_error": short_label("probe_knn_error"),
    "gpu_hours": "GPU-hours",
    "restarts": "restarts",
    "status": "status",
}
QUANTITY_COLUMNS = {
    "quantity": "quantity",
    "kind": "kind",
    "seed std of log": "seed std of log (noise floor)",
    "width effect (SE)": "width effect (SE of the seed spread, + = larger is better)",
    "improves in training": "share improving between evaluation points",
    "improves with D": "share improving with D",
    "improves with N": "share improving with N",
    "flag": "flag",
}
# Each analysis's heading, and the formula it fits where it fits one (the summary says the same).
FIT_TITLES = {
    "targets": "The study's targets: predicted, with 95% predictive intervals",
    "frontier": "Compute frontier L(C) = E + A C^-alpha",
    "chinchilla": "L(N, D) = E + A/N^alpha + B/D^beta",
    "isoflop": "IsoFLOP: N_opt(C) and D_opt(C)",
    "prediction check": "Prediction check: the largest model held out",
    "noise floor (seeds)": "Noise floor: the seeds' spread",
    "diagnostics": "Label-free diagnostics",
}
# fits.json's keys as people read them in the fit tables (fits.json keeps its own).
ROW_NAMES = {
    "points": "points fitted",
    "resampled_units": "runs resampled",
    "bootstrap": "bootstrap resamples",
    "held out N": "held-out N",
    "per D": "at each D",
    "std_log": "seed std of log",
    "cells": "(N, D) cells",
    "replicates": "runs",
    "width effect z": "width effect (standard errors of the seed spread)",
}
PERCENT_ROWS = ("observed inside the 95% interval", "mean |relative error|")
FIGURE_CAPTIONS = {
    "frontier": "The fitted quantity at every evaluation point against training compute, the "
    "compute-efficient frontier and its fit with the 95% bootstrap band.",
    "loss_curves": "Training-loss curves against compute, the compute-efficient frontier and its fit "
    "with the 95% bootstrap band.",
    "residuals": "log(observed / fitted L(N, D)) of each run's final point; grey: one seed std of log "
    "either side (the noise floor). A pattern beyond it is what the law misses.",
    "loss_vs_params": "Each run's final point against N, one line per D (bars: the seeds' range); "
    "dashed: L(N, D) with its 95% bootstrap band.",
    "prediction_check": "L(N, D) fitted without the largest model and predicted for it as a target is "
    "predicted: light band, the 95% predictive interval (the law's bootstrap and one run's seed noise); "
    "dark band, the law alone; against its observed seeds.",
    "targets": "Each target's prediction against N at the target's D, with the 95% predictive interval "
    "(the law's bootstrap and one run's seed noise); black, the study's final points at its longest D.",
    "diagnostics": "The label-free diagnostics against compute: described, never fitted across widths.",
    "isoflop": "Each compute budget's runs against N, with the parabola in log N and its minimum.",
    "n_opt": "The compute-optimal N at each budget with its interval, and the fitted N_opt(C).",
}


def describe(entry: dict) -> str:
    """One line for people: each parameter as a number with its interval, or why it is not identified."""
    if "params" not in entry:
        if not entry.get("identified", True):
            return f"not identified ({entry['reason']})"
        return ", ".join(f"{k} = {display(v)}" for k, v in entry.items() if k not in ("identified", "table"))
    params = entry["params"]
    shown = [f"{k} = {as_estimate(p)}" for k, p in params.items()]
    return "; ".join(shown)


def as_estimate(value: Estimate | dict) -> Estimate:
    """A parameter as the fit holds it or as fits.json does."""
    return value if isinstance(value, Estimate) else Estimate.from_dict(value)


def display(value) -> str:
    """A value for people: estimates with their interval, numbers in 4 significant digits, no NaN."""
    if isinstance(value, Estimate):
        return str(value)
    if isinstance(value, dict) and "value" in value and "identified" in value:
        return str(Estimate.from_dict(value))
    if isinstance(value, bool):
        return str(value)
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):  # NaN, NaT, pd.NA
        return ""
    if isinstance(value, int | float | np.floating | np.integer):
        return human(value)
    if isinstance(value, list):
        return "; ".join(display(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {display(v)}" for k, v in value.items())
    return str(value)


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Every cell as people read it (``display``): 4 significant digits, thousands separated, and
    an empty cell where a value is missing, never "NaN"."""
    return frame.astype(object).apply(lambda column: column.map(display))


def run_table(table: pd.DataFrame, convention: str) -> pd.DataFrame:
    """The runs, smallest model first, under column names that say what each number is."""
    flops = f"flops_{convention}"
    order = [*list(RUN_COLUMNS)[:7], flops, *list(RUN_COLUMNS)[7:]]
    columns = [c for c in order if c in table]
    rows = (
        table[columns].sort_values(["params", "run_id", "eval_point"])
        if "params" in table
        else table[columns]
    )
    return rows.rename(columns=RUN_COLUMNS | {flops: f"training FLOPs ({convention})"})


def quantity_frame(report: Report) -> pd.DataFrame | None:
    result = report.analyses.get("quantities")
    if result is None or result.fit is None:
        return None
    shares = ["improves in training", "improves with D", "improves with N"]
    frame = result.fit.assign(**{c: result.fit[c].map(_percent) for c in shares if c in result.fit})
    frame = frame.rename(columns=QUANTITY_COLUMNS)
    frame.insert(1, "what", [label(q) for q in result.fit["quantity"]])
    return frame


def _percent(share: float) -> str:
    return f"{100 * share:.0f}%" if share is not None and math.isfinite(share) else ""


def fit_rows(entry: dict, convention: str) -> dict[str, str | pd.DataFrame]:
    """A fit's lines for people: its parameters (or why it is not identified), then its facts, under
    names that say what they are; a list of records (the prediction check's D) becomes a table."""
    rows: dict[str, str | pd.DataFrame] = {}
    if not entry.get("identified", True) and "params" not in entry:
        rows["result"] = f"not identified ({entry['reason']})"
    for name, value in entry.get("params", {}).items():
        rows[name] = display(value)
    for name, value in entry.items():
        if name in ("params", "identified", "reason", "table"):
            continue
        shown = f"fit starts at (training FLOPs, {convention})" if name == "starts at FLOPs" else name
        shown = ROW_NAMES.get(name, shown)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows[shown] = pd.DataFrame(value)
        elif name in PERCENT_ROWS and isinstance(value, float):
            rows[shown] = _percent(value)
        else:
            rows[shown] = display(value)
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header, so that wide figures get the page's whole width."""
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def _figure(name: str, path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    width, height = _png_size(path)
    css = " class='wide'" if width > 2 * height else ""
    caption = html.escape(FIGURE_CAPTIONS.get(name, name))
    return (
        f"<figure{css}><img src='data:image/png;base64,{data}' alt='{html.escape(name)}'>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _table(frame: pd.DataFrame) -> str:
    """A table that scrolls sideways rather than running off the page."""
    return "<div class='scroll'>" + readable(frame).to_html(index=False, escape=True, border=0) + "</div>"


def _rows(d: dict) -> str:
    cells = {k: _table(v) if isinstance(v, pd.DataFrame) else html.escape(str(v)) for k, v in d.items()}
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td>{v}</td></tr>" for k, v in cells.items())


def _items(lines: list[str], css: str = "", lead: bool = False) -> str:
    """A list; with ``lead``, each line's words before its first colon in bold (the summary's
    "Noise floor:"), so that a reader finds a line at a glance."""
    cls = f" class='{css}'" if css else ""

    def item(line: str) -> str:
        head, colon, rest = line.partition(": ")
        if lead and colon:
            return f"<b>{html.escape(head)}</b>: {html.escape(rest)}"
        return html.escape(line)

    return "<ul>" + "".join(f"<li{cls}>{item(line)}</li>" for line in lines) + "</ul>"


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
    "text-align:left;vertical-align:top}th{background:#f6f6f6}.scroll{overflow-x:auto}"
    "figure{display:inline-block;vertical-align:top;width:48%;margin:0 1.5% 1.5em 0}"
    "figure.wide{width:98%}img{width:100%}figcaption{font-size:13px;color:#444}.warn{color:#a40}"
    ".summary{background:#f4f7fb;border-left:4px solid #36c;padding:0.4em 1em}"
)


def write_html(out: Path, report: Report) -> Path:
    convention = report.settings.convention
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>nepa-scale report</title>"
        f"<style>{STYLE}</style></head><body><h1>Scaling report</h1>",
        "<h2>What this study shows</h2><div class='summary'>" + _items(report.summary, lead=True) + "</div>",
        "<h2>Warnings</h2>" + (_items(report.warnings, "warn") if report.warnings else "<p>none</p>"),
        "<h2>Figures</h2>" + "".join(_figure(name, p) for name, p in report.figures.items()),
        "<h2>Fits</h2>",
    ]
    for name, entry in report.fits.items():
        if name != "quantities":
            title = html.escape(FIT_TITLES.get(name, name))
            parts.append(f"<h3>{title}</h3><table>{_rows(fit_rows(entry, convention))}</table>")
    quantities = quantity_frame(report)
    if quantities is not None:
        parts.append("<h2>Candidate quantities: noise and monotonicity</h2>" + _table(quantities))
    if report.transfer:
        parts.append("<h2>Transfer</h2>" + _items(report.transfer))
    parts.append(f"<h2>Conventions</h2><table>{_rows(report.conventions)}</table>")
    parts.append("<h2>Runs</h2>" + _table(run_table(report.table, convention)))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table (no tabulate needed), its cells as ``readable`` writes them."""
    cells = readable(frame)

    def row(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    lines = [row(cells.columns), row(["---"] * len(cells.columns))]
    return "\n".join(lines + [row(values) for values in cells.itertuples(index=False)])


def _markdown_rows(rows: dict[str, str | pd.DataFrame]) -> list[str]:
    lines = []
    for name, value in rows.items():
        if isinstance(value, pd.DataFrame):
            lines += [f"- {name}:", "", markdown_table(value), ""]
        else:
            lines.append(f"- {name}: {value}")
    return lines


def write_markdown(out: Path, report: Report) -> Path:
    convention = report.settings.convention
    lines = ["# Scaling report", "", "## What this study shows", ""] + [f"- {x}" for x in report.summary]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in report.warnings] or ["none"])
    lines += ["", "## Figures", ""]
    for name, path in report.figures.items():
        lines += [f"![{name}](figures/{path.name})", "", f"*{FIGURE_CAPTIONS.get(name, name)}*", ""]
    lines += ["## Fits", ""]
    for name, entry in report.fits.items():
        if name != "quantities":
            lines += [
                f"### {FIT_TITLES.get(name, name)}",
                "",
                *_markdown_rows(fit_rows(entry, convention)),
                "",
            ]
    quantities = quantity_frame(report)
    if quantities is not None:
        lines += ["## Candidate quantities: noise and monotonicity", "", markdown_table(quantities), ""]
    if report.transfer:
        lines += ["## Transfer", ""] + [f"- {t}" for t in report.transfer] + [""]
    lines += ["## Conventions", ""] + [f"- **{k}**: {v}" for k, v in report.conventions.items()]
    lines += ["", "## Runs", "", markdown_table(run_table(report.table, convention))]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
