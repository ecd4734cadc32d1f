"""Figures for a scaling study: PNG and SVG, log axes, units and conventions in every label."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from nepa_scale.scaling.fits import ChinchillaFit, IsoFlopFit, PowerLawFit  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10})


def size_colors(sizes) -> dict[float, tuple]:
    """One colour per model size, ordered small (dark) to large (light), the same in every figure."""
    unique = sorted(set(float(s) for s in sizes))
    cmap = plt.get_cmap("viridis")
    return {s: cmap(i / max(1, len(unique) - 1) * 0.9) for i, s in enumerate(unique)}


def _millions(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n / 1e3:.3g}k"


def loss_curves(
    curves: pd.DataFrame,
    frontier: pd.DataFrame | None,
    fit: PowerLawFit | None,
    quantity_label: str,
    convention: str,
) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = size_colors(curves["params"])
    for (params, run_id), group in curves.groupby(["params", "run_id"]):  # legend from small to large
        ax.plot(
            group["flops"],
            group["cosine_distance"],
            color=colors[float(params)],
            lw=1.2,
            alpha=0.85,
            label=f"{_millions(params)} params",
            gid=f"run:{run_id}",
        )
    if frontier is not None and len(frontier):
        ax.scatter(
            frontier["flops"],
            frontier["cosine_distance"],
            s=10,
            color="k",
            zorder=3,
            label="frontier",
            gid="frontier",
        )
    if fit is not None:
        xs = np.logspace(np.log10(curves["flops"].min()), np.log10(curves["flops"].max()), 200)
        ax.plot(
            xs, fit.predict(xs), "r--", lw=1.5, gid="fit", label=f"fit: E + A C^-α, α={fit.alpha.value:.3f}"
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"training FLOPs ({convention})",
        ylabel=quantity_label,
        title="Loss curves and the compute-efficient frontier",
    )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    return fig


def isoflop_curves(table: pd.DataFrame, iso: IsoFlopFit, quantity_label: str, n_label: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("plasma")
    for i, (budget, coef) in enumerate(zip(iso.budgets, iso.parabolas, strict=True)):
        color = cmap(i / max(1, len(iso.budgets) - 1) * 0.85)
        rows = table[np.isclose(table["compute"], budget)]
        ax.scatter(
            rows["N"],
            rows["quantity"],
            color=color,
            s=18,
            gid=f"points:{budget:.3g}",
            label=f"C = {budget:.2g}",
        )
        xs = np.linspace(np.log(rows["N"].min()) - 0.3, np.log(rows["N"].max()) + 0.3, 100)
        ax.plot(np.exp(xs), np.polyval(coef, xs), color=color, lw=1, gid=f"parabola:{budget:.3g}")
        ax.scatter(
            [iso.n_opt[i]],
            [iso.loss_opt[i]],
            marker="*",
            s=90,
            color=color,
            edgecolor="k",
            zorder=3,
            gid=f"min:{budget:.3g}",
        )
    ax.set(
        xscale="log", xlabel=f"N ({n_label})", ylabel=quantity_label, title="IsoFLOP curves (stars: minima)"
    )
    ax.legend(fontsize=8)
    return fig


def n_opt_vs_compute(iso: IsoFlopFit, n_label: str, convention: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(iso.budgets, iso.n_opt, color="k", zorder=3, label="IsoFLOP minima", gid="minima")
    xs = np.logspace(np.log10(iso.budgets.min()) - 0.3, np.log10(iso.budgets.max()) + 0.3, 100)
    ax.plot(xs, iso.n_opt_at(xs), "b-", gid="fit", label=f"N_opt ∝ C^{iso.n_exponent.value:.3f}")
    if np.isfinite(iso.n_exponent.low):
        pivot = np.exp(np.mean(np.log(iso.budgets)))
        centre = iso.n_opt_at(pivot)
        lo = centre * (xs / pivot) ** iso.n_exponent.low
        hi = centre * (xs / pivot) ** iso.n_exponent.high
        ax.fill_between(
            xs,
            np.minimum(lo, hi),
            np.maximum(lo, hi),
            color="b",
            alpha=0.15,
            gid="band",
            label=f"95% interval of the exponent [{iso.n_exponent.low:.3f}, {iso.n_exponent.high:.3f}]",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"training FLOPs ({convention})",
        ylabel=f"N_opt ({n_label})",
        title="Compute-optimal model size",
    )
    ax.legend(fontsize=8)
    return fig


def loss_vs_params(table: pd.DataFrame, quantity_label: str, n_label: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    budgets = sorted(
        table["eval_point"].unique(), key=lambda b: (b == "final", float(b) if b != "final" else 0)
    )
    cmap = plt.get_cmap("plasma")
    for i, budget in enumerate(budgets):
        rows = table[table["eval_point"] == budget].sort_values("N")
        ax.plot(
            rows["N"],
            rows["quantity"],
            "o-",
            color=cmap(i / max(1, len(budgets) - 1) * 0.85),
            ms=4,
            label=f"budget {budget}",
            gid=f"budget:{budget}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"N ({n_label})",
        ylabel=quantity_label,
        title="Loss vs model size per budget",
    )
    ax.legend(fontsize=8)
    return fig


def residuals(table: pd.DataFrame, fit: ChinchillaFit, d_label: str, n_label: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = size_colors(table["N"])
    resid = np.log(table["quantity"]) - np.log(fit.predict(table["N"], table["D"]))
    for n, group in table.assign(resid=resid).groupby("N"):
        ax.scatter(
            group["D"],
            group["resid"],
            color=colors[float(n)],
            s=16,
            label=f"N={_millions(n)}",
            gid=f"resid:{n}",
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(
        xscale="log", xlabel=f"D ({d_label})", ylabel="log(observed) - log(fit)", title="Residuals of L(N, D)"
    )
    ax.legend(fontsize=7, ncol=2)
    return fig


def downstream_vs_compute(table: pd.DataFrame, metric: str, convention: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = size_colors(table["N"])
    for n, group in table.groupby("N"):
        ax.plot(
            group["compute"],
            group[metric],
            "o-",
            color=colors[float(n)],
            ms=4,
            label=f"N={_millions(n)}",
            gid=f"downstream:{n}",
        )
    ax.set(xscale="log", xlabel=f"training FLOPs ({convention})", ylabel=metric, title=f"{metric} vs compute")
    ax.legend(fontsize=8)
    return fig


def save(fig: plt.Figure, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("png", "svg")}
    for path in paths.values():
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths
