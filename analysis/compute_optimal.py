"""Compute-optimal allocation for a given budget from a sweep's Chinchilla fit.

    python analysis/compute_optimal.py SWEEP_DIR --compute 1e21 [--bootstrap 1000]

Fits L(N, D) = E + A/N^alpha + B/D^beta on the completed runs' final points (the quantity
`nepa-scale report` fits by default: the online linear-probe error, else the kNN error, else the
held-out NEPA loss with a warning; --quantity to choose), then prints N_opt and D_opt
for each budget with 95% bootstrap intervals, the FLOPs per (parameter x image) taken from the
sweep itself (C = k N D, k the median over its runs). An allocation far beyond the trained model
sizes is an extrapolation of the law, said in proportion; a fit whose parameters are not
identified gives no allocation at all.
"""

from __future__ import annotations

import argparse
import math

from nepa_scale.scaling.collect import collect
from nepa_scale.scaling.fits import fit_chinchilla, human
from nepa_scale.scaling.quantities import label, resolve_quantity
from nepa_scale.scaling.report import StudySettings, fit_table


def extrapolation_note(n_opt: float, trained: tuple[float, float]) -> str:
    """How far N_opt lies outside the trained sizes, in words proportional to the distance."""
    low, high = trained
    factor = max(n_opt / high, low / n_opt, 1.0)
    if factor <= 1.0:
        return "inside the trained sizes"
    decades = math.log10(factor)
    if factor < 3:
        return f"{factor:.2g}x outside the trained sizes: a short extrapolation"
    if factor < 100:
        return f"{factor:.3g}x ({decades:.1f} decades) outside the trained sizes: the law is assumed to hold there"
    return (
        f"{factor:.3g}x ({decades:.1f} decades) outside the trained sizes {human(low)}-{human(high)}: "
        "far beyond the data; treat it as a guess, not a prediction"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir")
    parser.add_argument("--compute", type=float, nargs="+", required=True, help="training FLOPs (6N+attn)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument(
        "--quantity", default="auto", help="the fitted column (default: as nepa-scale report)"
    )
    args = parser.parse_args()
    rows = collect(args.sweep_dir).query("status == 'completed' and eval_point == 'final'")
    quantity, warnings = resolve_quantity(rows, args.quantity)
    for warning in warnings:
        print(f"warning: {warning}")
    table = fit_table(rows, StudySettings(n_bootstrap=args.bootstrap), quantity)
    fit = fit_chinchilla(
        table["N"],
        table["D"],
        table["quantity"],
        table["run_id"],
        replicates=table["seed"],
        n_bootstrap=args.bootstrap,
    )
    k = float((table["compute"] / (table["N"] * table["D"])).median())
    print(f"fit on {fit.n_points} runs ({label(quantity)}; N = total params, D = images):")
    for name, est in fit.params.items():
        print(f"  {name:>5} = {est}")
    for warning in fit.warnings:
        print(f"  warning: {warning}")
    if not (fit.params["alpha"].identified and fit.params["beta"].identified):
        print("N_opt, D_opt: not identified (alpha or beta is not identified, see above): no allocation")
        return
    trained = (float(table["N"].min()), float(table["N"].max()))
    print(f"FLOPs per parameter-image in this sweep: k = {k:.4g} (C = k N D, 6N+attn)")
    for compute in args.compute:
        n_opt = fit.allocation_interval(compute, k)
        n, d = fit.optimal_allocation(compute, k)
        print(
            f"C = {compute:.3g}: N_opt = {n_opt} params, D_opt = {human(d)} images, "
            f"predicted {fit.predict(n, d).item():.4g}; {extrapolation_note(n, trained)}"
        )


if __name__ == "__main__":
    main()
