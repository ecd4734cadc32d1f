"""Compare two sweeps (e.g. GeLU vs SwiGLU, or two data sets) on the same axes.

    python analysis/compare_sweeps.py SWEEP_A SWEEP_B [--labels A B] [--out compare.png]

For each sweep: the compute-efficient frontier of 1 + loss against training FLOPs (6N+attn), its
saturating power-law fit with a 95% interval on the exponent, and one figure with both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nepa_scale.scaling.collect import collect_curves  # noqa: E402
from nepa_scale.scaling.fits import fit_power_law, pareto_frontier  # noqa: E402
from nepa_scale.scaling.report import frontier_start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs=2)
    parser.add_argument("--labels", nargs=2, default=None)
    parser.add_argument("--out", default="compare.png")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    labels = args.labels or [Path(s).name for s in args.sweeps]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for sweep, label, color in zip(args.sweeps, labels, ("tab:blue", "tab:orange"), strict=True):
        curves = collect_curves(sweep)
        frontier = curves.iloc[pareto_frontier(curves["flops"], curves["cosine_distance"])]
        start = frontier_start(frontier)  # past the initial plateau, as `nepa-scale report` fits it
        fitted = frontier[frontier["flops"] >= start]
        fit = fit_power_law(fitted["flops"], fitted["cosine_distance"], n_bootstrap=args.bootstrap)
        print(
            f"{label}: E = {fit.E}, A = {fit.A}, alpha = {fit.alpha} ({fit.n_points} frontier points "
            f"from {start:.3g} FLOPs)"
        )
        ax.scatter(frontier["flops"], frontier["cosine_distance"], s=8, color=color)
        xs = np.logspace(np.log10(start), np.log10(frontier["flops"].max()), 100)
        ax.plot(xs, fit.predict(xs), color=color, label=f"{label}: alpha = {fit.alpha}")
        low, high = fit.band(xs)
        if np.isfinite(low).all():
            ax.fill_between(xs, low, high, color=color, alpha=0.15)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs (6N+attn)",
        ylabel="mean cosine distance (1 + loss)",
    )
    ax.legend(fontsize=8)
    fig.savefig(args.out, bbox_inches="tight")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
