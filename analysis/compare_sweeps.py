"""Compare two sweeps (e.g. GeLU vs SwiGLU, or two data sets) on the same axes.

    python analysis/compare_sweeps.py SWEEP_A SWEEP_B [--labels A B] [--out compare.png]

For each sweep: the compute-efficient frontier of the quantity `nepa-scale report` fits (by
default the online linear-probe error, else the kNN error; a NEPA loss only with a warning: each
model's targets are its own embeddings, so losses of two sweeps measure different tasks) against
training FLOPs (6N+attn), its saturating power-law fit with a 95% interval on the exponent, and
one figure with both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import tempfile  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nepa_scale.scaling.analyses import fit_frontier  # noqa: E402
from nepa_scale.scaling.quantities import label as quantity_label  # noqa: E402
from nepa_scale.scaling.report import StudySettings, load_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweeps", nargs=2)
    parser.add_argument("--labels", nargs=2, default=None)
    parser.add_argument("--out", default="compare.png")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--quantity", default="auto", help="the fitted column (default: as nepa-scale report)"
    )
    args = parser.parse_args()
    labels = args.labels or [Path(s).name for s in args.sweeps]
    settings = StudySettings(n_bootstrap=args.bootstrap, quantity=args.quantity)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    columns = set()
    for sweep, label, color in zip(args.sweeps, labels, ("tab:blue", "tab:orange"), strict=True):
        with tempfile.TemporaryDirectory() as scratch:  # the table load_study writes
            _, study, warnings = load_study(Path(sweep), Path(scratch), settings)
        for warning in warnings:
            print(f"{label}: warning: {warning}")
        found = fit_frontier(study)  # past the initial plateau, as `nepa-scale report` fits it
        fit, start, points = found.fit, found.start, found.points
        columns.add(found.column)
        if fit is None:
            print(f"{label}: frontier not identified ({found.entry['reason']})")
            continue
        print(
            f"{label}: {found.column}: E = {fit.E}, A = {fit.A}, alpha = {fit.alpha} ({fit.n_points} "
            f"frontier points from {start:.3g} FLOPs)"
        )
        ax.scatter(points["flops"], points[found.column], s=8, color=color)
        xs = np.logspace(np.log10(start), np.log10(points["flops"].max()), 100)
        ax.plot(xs, fit.predict(xs), color=color, label=f"{label}: alpha = {fit.alpha}")
        low, high = fit.band(xs)
        if np.isfinite(low).all():
            ax.fill_between(xs, low, high, color=color, alpha=0.15)
    if len(columns) > 1:
        print(f"warning: the sweeps fit different quantities ({', '.join(sorted(columns))}): not comparable")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="training FLOPs (6N+attn)",
        ylabel=" / ".join(quantity_label(c) for c in sorted(columns)),
    )
    ax.legend(fontsize=8)
    fig.savefig(args.out, bbox_inches="tight")
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
