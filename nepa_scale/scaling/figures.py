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


def _count(n: float) -> str:
    """A count for a legend: 7.46k, 104k, 1.5M, 2.1B (never 0.104M or 1.92e+04)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def loss_curves(
    curves: pd.DataFrame,
    frontier: pd.DataFrame | None,
    fit: PowerLawFit | None,
    quantity_label: str,
    convention: str,
    fit_from: float | None = None,
    column: str = "cosine_distance",
) -> plt.Figure:
    """The runs' curves of ``column`` (the training loss, or a quantity at the evaluation points), the
    compute-efficient frontier, and its fit with the 95% bootstrap band (drawn from ``fit_from``,
    where the fit starts)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = size_colors(curves["params"])
    marker = "" if column == "cosine_distance" else "."
    for (params, run_id), group in curves.groupby(["params", "run_id"]):  # legend from small to large
        ax.plot(
            group["flops"],
            group[column],
            marker=marker,
            ms=3,
            color=colors[float(params)],
            lw=1.2,
            alpha=0.85,
            label=f"{_count(params)} params",
            gid=f"run:{run_id}",
        )
    if frontier is not None and len(frontier):
        ax.scatter(
            frontier["flops"],
            frontier[column],
            s=10,
            color="k",
            zorder=3,
            label="frontier",
            gid="frontier",
        )
    if fit is not None:
        start = fit_from if fit_from is not None else curves["flops"].min()
        xs = np.logspace(np.log10(start), np.log10(curves["flops"].max()), 200)
        alpha = f"α={fit.alpha.value:.3f}" if fit.alpha.identified else "α not identified"
        ax.plot(xs, fit.predict(xs), "r--", lw=1.5, gid="fit", label=f"fit: E + A C^-α, {alpha}")
        low, high = fit.band(xs)
        if np.isfinite(low).all():
            ax.fill_between(xs, low, high, color="r", alpha=0.15, gid="band", label="95% bootstrap band")
    if fit_from is not None:
        ax.axvline(fit_from, color="0.5", lw=0.8, ls=":", gid="fit_from", label="frontier fit starts")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"training FLOPs ({convention})",
        ylabel=quantity_label,
        title=("Loss curves" if column == "cosine_distance" else "Evaluation points")
        + " and the compute-efficient frontier",
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
    ax.plot(xs, iso.n_opt_at(xs), "b-", gid="fit", label=f"N_opt ∝ C^a, a = {iso.n_exponent}")
    low, high = iso.interval_at(xs, "N")
    if np.isfinite(low).all():
        ax.fill_between(xs, low, high, color="b", alpha=0.15, gid="band", label="95% bootstrap band")
    for budget, minimum in zip(iso.budgets, iso.minima, strict=True):
        if minimum.has_interval:
            ax.plot(
                [budget, budget], [minimum.low, minimum.high], color="k", lw=1, gid=f"minimum:{budget:.3g}"
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


def loss_vs_params(
    final: pd.DataFrame, fit: ChinchillaFit | None, quantity_label: str, n_label: str, d_label: str
) -> plt.Figure:
    """Each run's final point; one line per compute budget (IsoFLOP runs) or per D, so that no line
    joins points of different budgets; the fitted L(N, D) of each D with its 95% bootstrap band."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_budget = "flops_budget" in final and final["flops_budget"].notna().all()
    key = "flops_budget" if by_budget else "D"
    groups = sorted(final[key].unique())
    cmap = plt.get_cmap("plasma")
    for i, value in enumerate(groups):
        rows = final[final[key] == value].groupby("N", as_index=False)["quantity"].agg(["mean", "min", "max"])
        color = cmap(i / max(1, len(groups) - 1) * 0.85)
        label = f"C = {value:.2g}" if by_budget else f"D = {_count(value)}"
        ax.plot(rows["N"], rows["mean"], "o-", color=color, ms=4, label=label, gid=f"{key}:{value:.4g}")
        if (rows["max"] > rows["min"]).any():  # seeds: their range
            ax.vlines(rows["N"], rows["min"], rows["max"], color=color, lw=1, gid=f"seeds:{value:.4g}")
        if fit is not None and not by_budget:
            ns = np.logspace(np.log10(final["N"].min()), np.log10(final["N"].max()), 60)
            ax.plot(
                ns, fit.predict(ns, np.full_like(ns, value)), "--", color=color, lw=1, gid=f"fit:{value:.4g}"
            )
            low, high = fit.band(ns, np.full_like(ns, value))
            if np.isfinite(low).all():
                ax.fill_between(ns, low, high, color=color, alpha=0.12, gid=f"band:{value:.4g}")
    title = f"Each run's final point vs model size, per {'compute budget' if by_budget else 'D'}"
    if fit is not None and not by_budget:
        title += " (dashed: L(N, D) fit, 95% band)"
    ax.set(xscale="log", yscale="log", xlabel=f"N ({n_label})", ylabel=quantity_label, title=title)
    ax.legend(fontsize=8, title=None if by_budget else f"D: {d_label}", title_fontsize=8)
    return fig


def residuals(
    table: pd.DataFrame, fit: ChinchillaFit, d_label: str, n_label: str, noise: float | None = None
) -> plt.Figure:
    """log(observed / fit) per run; ``noise`` (the seeds' std of log) shades the band within which a
    residual is seed noise rather than something the law misses."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = size_colors(table["N"])
    resid = np.log(table["quantity"]) - np.log(fit.predict(table["N"], table["D"]))
    for n, group in table.assign(resid=resid).groupby("N"):
        ax.scatter(
            group["D"],
            group["resid"],
            color=colors[float(n)],
            s=16,
            label=f"N={_count(n)}",
            gid=f"resid:{n}",
        )
    ax.axhline(0, color="k", lw=0.8)
    if noise is not None and np.isfinite(noise):
        ax.axhspan(-noise, noise, color="0.5", alpha=0.15, label="seed noise (±1 std of log)", gid="noise")
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
            label=f"N={_count(n)}",
            gid=f"downstream:{n}",
        )
    ax.set(xscale="log", xlabel=f"training FLOPs ({convention})", ylabel=metric, title=f"{metric} vs compute")
    ax.legend(fontsize=8)
    return fig


def prediction_check(points: pd.DataFrame, quantity_label: str, d_label: str, n_label: str) -> plt.Figure:
    """The held-out largest model: each seed's observed value per D, and the prediction of the fit
    without it with its 95% bootstrap interval."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        points["D"], points["observed"], color="k", s=18, zorder=3, label="observed (seeds)", gid="observed"
    )
    ax.plot(points["D"], points["predicted"], "r--o", ms=4, label="predicted without it", gid="predicted")
    if np.isfinite(points["low"]).all():
        ax.fill_between(
            points["D"],
            points["low"],
            points["high"],
            color="r",
            alpha=0.12,
            label="95% predictive interval (law + one run's seed noise)",
            gid="band",
        )
    if "fit_low" in points and np.isfinite(points["fit_low"]).all():
        ax.fill_between(
            points["D"],
            points["fit_low"],
            points["fit_high"],
            color="r",
            alpha=0.25,
            label="95% interval of the law alone",
            gid="law_band",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"D ({d_label})",
        ylabel=quantity_label,
        title=f"Prediction check: the largest model (N = {_count(points['N'].iloc[0])}, {n_label}) held out",
    )
    ax.legend(fontsize=8)
    return fig


def target_prediction(
    final: pd.DataFrame, predicted, quantity_label: str, n_label: str, d_label: str
) -> plt.Figure:
    """Each target's prediction against N at its D, with the 95% predictive band, beside the study's
    final points at its longest D and the law there (observed points at other D are not comparable)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fit, noise = predicted.fit, predicted.noise_std
    longest = final[final["D"] == final["D"].max()]
    ax.scatter(
        longest["N"],
        longest["quantity"],
        color="k",
        s=16,
        zorder=3,
        label=f"observed at D = {_count(final['D'].max())}",
    )
    low_n = float(final["N"].min())
    for p in predicted.predictions:
        n = np.geomspace(low_n, max(p.target.n, float(final["N"].max())), 60)
        for d, style in ((float(final["D"].max()), "k--"), (p.target.d, "r-")):
            x = np.stack([n, np.full_like(n, d)], axis=1)
            ax.plot(n, np.exp(fit.log_predict(x)), style, lw=1, label=f"law at D = {_count(d)}")
        x = np.stack([n, np.full_like(n, p.target.d)], axis=1)
        draws = fit.log_draws(x) + noise * np.random.default_rng(0).standard_normal((len(fit.samples), 1))
        low, high = np.exp(np.percentile(draws, [2.5, 97.5], axis=0))
        ax.fill_between(n, low, high, color="r", alpha=0.12, label="95% predictive interval")
        ax.errorbar(
            [p.target.n],
            [p.value],
            yerr=[[p.value - p.low], [p.high - p.value]],
            fmt="r*",
            ms=10,
            capsize=4,
            label=f"{p.target.label}" + ("" if p.usable else " (not usable)"),
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel=f"N ({n_label})",
        ylabel=quantity_label,
        title="The study's targets",
    )
    ax.legend(fontsize=7)
    return fig


def diagnostics_vs_compute(evaluations: pd.DataFrame, columns: dict[str, str], convention: str) -> plt.Figure:
    """One panel per diagnostic: its value at every evaluation point of every run, against compute."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    colors = size_colors(evaluations["params"])
    shown = evaluations[(evaluations["flops"] > 0) & evaluations["own"]]
    for ax, (column, text) in zip(axes[0], columns.items(), strict=True):
        for (params, run_id), group in shown.groupby(["params", "run_id"]):
            ax.plot(
                group["flops"],
                group[column],
                ".-",
                ms=3,
                lw=0.8,
                color=colors[float(params)],
                label=f"{_count(params)} params",
                gid=f"{column}:{run_id}",
            )
        ax.set(xscale="log", xlabel=f"training FLOPs ({convention})", title=text, ylabel=column)
        ax.title.set_fontsize(9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0][0].legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("png", "svg")}
    for path in paths.values():
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return paths
