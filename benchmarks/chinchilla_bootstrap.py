"""Time a Chinchilla (approach 3) fit with 1000 bootstrap resamples on 250 points.

Usage: python benchmarks/chinchilla_bootstrap.py [RESAMPLES]. Data: 10 model sizes x 25 data
budgets from known parameters with 1% multiplicative noise; prints the time and the estimates.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from nepa_scale.scaling.fits import fit_chinchilla

TRUE = {"E": 0.05, "A": 40.0, "B": 200.0, "alpha": 0.34, "beta": 0.28}


def main(resamples: int = 1000) -> None:
    rng = np.random.default_rng(0)
    n = np.repeat(np.logspace(6, 9, 10), 25)
    d = np.tile(np.logspace(7, 10, 25), 10)
    y = (TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]) * np.exp(
        rng.normal(0, 0.01, n.shape)
    )
    start = time.perf_counter()
    fit = fit_chinchilla(n, d, y, n_bootstrap=resamples, seed=0)
    elapsed = time.perf_counter() - start
    print(f"{len(y)} points, {fit.n_bootstrap} resamples: {elapsed:.1f} s")
    for key, value in TRUE.items():
        print(
            f"  {key:>5}: true {value:<6} fit {fit.params[key]}  (inside 95% interval: {fit.params[key].contains(value)})"
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
