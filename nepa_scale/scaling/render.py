"""A ``Report`` for people: ``report.html`` (self-contained, figures embedded) and ``report.md``.

Both open with what the study shows (the fitted quantity, what is identified, the noise floor, the
prediction check), then warnings, figures, the fits, how each candidate quantity behaves, transfer,
conventions and the run table.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.scaling.fits import Estimate, human
from nepa_scale.scaling.quantities import label
from nepa_scale.scaling.study import Report

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
    "val_loss",
    "probe_linear_error",
    "probe_knn_error",
    "gpu_hours",
    "restarts",
    "status",
]
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


def describe(entry: dict) -> str:
    """One line for people: each parameter as a number with its interval, or why it is not identified."""
    if "params" not in entry:
        if not entry.get("identified", True):
            return f"not identified ({entry['reason']})"
        return ", ".join(f"{k} = {display(v)}" for k, v in entry.items() if k not in ("identified", "table"))
    params = entry["params"]
    shown = [f"{k} = {p if isinstance(p, Estimate) else Estimate.from_dict(p)}" for k, p in params.items()]
    return "; ".join(shown)


def display(value) -> str:
    if isinstance(value, Estimate):
        return str(value)
    if isinstance(value, dict) and "value" in value and "identified" in value:
        return str(Estimate.from_dict(value))
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float | np.floating | np.integer):
        return human(value)
    if isinstance(value, list):
        return "; ".join(display(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {display(v)}" for k, v in value.items())
    return str(value)


def run_table(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in RUN_COLUMNS if c in table]
    return table[cols].sort_values(["params", "run_id", "eval_point"]) if "params" in table else table[cols]


def quantity_frame(report: Report) -> pd.DataFrame | None:
    result = report.analyses.get("quantities")
    if result is None or result.fit is None:
        return None
    frame = result.fit.rename(columns=QUANTITY_COLUMNS)
    frame.insert(1, "what", [label(q) for q in result.fit["quantity"]])
    return frame


def fit_rows(entry: dict) -> dict:
    """A fit's lines for people: its parameters (or why it is not identified), then its facts."""
    rows = {}
    if not entry.get("identified", True) and "params" not in entry:
        rows["result"] = f"not identified ({entry['reason']})"
    for name, value in entry.get("params", {}).items():
        rows[name] = display(value)
    for name, value in entry.items():
        if name not in ("params", "identified", "reason", "table"):
            rows[name] = display(value)
    return rows


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{path.stem}">'
        f"<figcaption>{path.stem}</figcaption></figure>"
    )


def _rows(d: dict) -> str:
    return "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in d.items()
    )


def _items(lines: list[str], css: str = "") -> str:
    cls = f" class='{css}'" if css else ""
    return "<ul>" + "".join(f"<li{cls}>{html.escape(line)}</li>" for line in lines) + "</ul>"


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}"
    "img{max-width:520px}figure{display:inline-block}.warn{color:#a40}"
    ".summary{background:#f4f7fb;border-left:4px solid #36c;padding:0.4em 1em}"
)


def write_html(out: Path, report: Report) -> Path:
    number = lambda x: f"{x:.4g}"  # noqa: E731
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>nepa-scale report</title><style>{STYLE}</style>"
        "</head><body><h1>Scaling report</h1>",
        "<h2>What this study shows</h2><div class='summary'>" + _items(report.summary) + "</div>",
        "<h2>Warnings</h2>" + (_items(report.warnings, "warn") if report.warnings else "<p>none</p>"),
        "<h2>Figures</h2>" + "".join(_figure(p) for p in report.figures.values()),
        "<h2>Fits</h2>",
    ]
    for name, entry in report.fits.items():
        if name != "quantities":
            parts += [f"<h3>{html.escape(name)}</h3><table>", _rows(fit_rows(entry)), "</table>"]
    quantities = quantity_frame(report)
    if quantities is not None:
        parts.append(
            "<h2>Candidate quantities: noise and monotonicity</h2>"
            + quantities.to_html(index=False, float_format=number, na_rep="")
        )
    if report.transfer:
        parts.append("<h2>Transfer</h2>" + _items(report.transfer))
    parts += ["<h2>Conventions</h2><table>", _rows(report.conventions), "</table>"]
    parts.append(
        "<h2>Runs</h2>" + run_table(report.table).to_html(index=False, float_format=number, na_rep="")
    )
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def _markdown_table(frame: pd.DataFrame) -> str:
    try:
        return frame.to_markdown(index=False, floatfmt=".4g")
    except ImportError:  # tabulate is optional
        return frame.to_string(index=False)


def write_markdown(out: Path, report: Report) -> Path:
    lines = ["# Scaling report", "", "## What this study shows", ""] + [
        f"- {line}" for line in report.summary
    ]
    lines += ["", "## Warnings", ""] + ([f"- {w}" for w in report.warnings] or ["none"])
    lines += ["", "## Figures", ""] + [f"![{name}](figures/{p.name})" for name, p in report.figures.items()]
    lines += ["", "## Fits", ""]
    for name, entry in report.fits.items():
        if name != "quantities":
            lines += [f"### {name}", ""] + [f"- {k}: {v}" for k, v in fit_rows(entry).items()] + [""]
    quantities = quantity_frame(report)
    if quantities is not None:
        lines += ["## Candidate quantities: noise and monotonicity", "", _markdown_table(quantities), ""]
    if report.transfer:
        lines += ["## Transfer", ""] + [f"- {t}" for t in report.transfer] + [""]
    lines += ["## Conventions", ""] + [f"- **{k}**: {v}" for k, v in report.conventions.items()]
    lines += ["", "## Runs", "", _markdown_table(run_table(report.table))]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
