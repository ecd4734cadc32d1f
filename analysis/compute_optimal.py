"""Compute-optimal allocation for a given budget from a sweep's Chinchilla fit.

    python analysis/compute_optimal.py SWEEP_DIR --compute 1e21 [--bootstrap 1000]

Fits L(N, D) = E + A/N^alpha + B/D^beta (fitted quantity: 1 + loss) on the completed runs' final
points, then prints N_opt and D_opt for the budget, with the FLOPs per (parameter x image) taken
from the sweep itself (C = k N D, k the median over its runs), and the predicted quantity there.
"""

from __future__ import annotations

import argparse

from nepa_scale.scaling.collect import collect
from nepa_scale.scaling.fits import fit_chinchilla
from nepa_scale.scaling.report import StudySettings, fit_table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir")
    parser.add_argument("--compute", type=float, nargs="+", required=True, help="training FLOPs (6N+attn)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    settings = StudySettings(n_bootstrap=args.bootstrap)
    table = fit_table(
        collect(args.sweep_dir).query("status == 'completed' and eval_point == 'final'"), settings
    )
    fit = fit_chinchilla(
        table["N"], table["D"], table["quantity"], table["run_id"], n_bootstrap=args.bootstrap
    )
    k = float((table["compute"] / (table["N"] * table["D"])).median())
    print(f"fit on {fit.n_points} runs ({settings.quantity_label}; N = total params, D = images):")
    for name, est in fit.params.items():
        print(f"  {name:>5} = {est}")
    for warning in fit.warnings:
        print(f"  warning: {warning}")
    print(f"FLOPs per parameter-image in this sweep: k = {k:.4g} (C = k N D, 6N+attn)")
    for compute in args.compute:
        n, d = fit.optimal_allocation(compute, k)
        print(
            f"C = {compute:.3g}: N_opt = {n:.4g} params, D_opt = {d:.4g} images, predicted {fit.predict(n, d).item():.4g}"
        )


if __name__ == "__main__":
    main()
