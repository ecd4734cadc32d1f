"""The advisor's criterion on ScaleBench (Li et al. 2026, "Spend Less, Fit Better", arXiv 2604.22753):
target-region R^2 at 1%, 5% and 10% of the pool's cost, beside the paper's Table 2.

ScaleBench gives, per task, a pool of finished experiments (the ``train`` split: inputs, loss, and a
cost proxy, 6 N D here) and a target region (the ``test`` split: larger or longer runs). A method
starts from nothing, buys pool runs one after another (it sees a run's loss once bought) and, when
its spending reaches 1%, 5% and 10% of the whole pool's cost, fits the task's law to what it bought;
the score is the R^2 of that fit's predictions of the target region's losses (clipped to [-1, 1]).
Each setting is repeated 10 times.

Our method is ``nepa_scale.scaling.advise.advise`` as the library has it: the target region's points are its
targets, the unbought pool runs its candidates (cost: 6 N D), and every round it picks, greedily,
the runs that most lower the targets' summed predictive variance of log loss per unit of cost,
from the bootstrap ensemble of ``predict_targets``. A repeat:

1. a seed design: 2.5 x (the law's parameter count) runs drawn at random (the repeat's seed) among
   the 3 x as many cheapest runs of the pool, redrawn until every input takes two values at least
   (well under 0.1% of the pool's cost on both tasks);
2. for each checkpoint c in 1%, 5%, 10%: ``--rounds`` rounds, each fitting the law with
   ``--bootstrap`` resamples and spending its share of what is left below c of the pool's cost;
3. at c: the law fitted (least squares on log loss, warm-started from the last fit) to the runs
   bought so far, and R^2 of its predicted losses on the target region.

The laws are the tasks' reference laws, written here as ``Law`` objects (log loss = g(x; theta)),
reparameterised (log coefficients, N in units of 1e9) so that Levenberg-Marquardt is well scaled:

- farseer_scaling_law: the Farseer law (ScaleBench's only law for this task, 9 parameters)
  L = exp(s n^q + S) + exp(B n^b + Q) D^(-exp(A n^a + E)), n = N / 1e9;
- data_constrained_scaling_law: Muennighoff et al.'s data-constrained law (7 parameters)
  L = A / N'^alpha + B / D'^alpha + C with effective parameters N' and data D' that saturate in
  the repetitions R_N = N / min(rho U, N) - 1 and R_D = D / U - 1 (decay constants tau_N, tau_D),
  and the simpler ``dc_geomean``: L = A / N^alpha + B / D'^beta + E, D' = U^gamma D^(1 - gamma).
  ScaleBench's Table 2 averages 10 law forms on this task; we run these two (see docs).

``--method random`` is the control: the same seed design and fit, then one random affordable run
at a time (the paper's Random, from our seed design).

The data is read from a directory the user gives (``--data``), e.g. ``benchmark/dataset`` of a
clone of github.com/PlanarG/active-sl; nothing is downloaded. Reading parquet needs pyarrow.

    python benchmarks/advise_scalebench.py --data ~/active-sl/benchmark/dataset [--repeats 10]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from nepa_scale.errors import FitError
from nepa_scale.scaling.advise import advise
from nepa_scale.scaling.laws import Law, levenberg_marquardt
from nepa_scale.scaling.target import Target, predict_targets

CHECKPOINTS = (0.01, 0.05, 0.10)
N_UNIT = 1e9  # the Farseer law's N in billions: the same family, better-scaled parameters
TINY = 1e-300

# Li et al. 2026, Table 2 (as reproduced in the README of github.com/PlanarG/active-sl): mean R^2
# over 10 repeats (and, for data_constrained, over its 10 law forms) at 1% / 5% / 10%.
PAPER = {
    "data_constrained_scaling_law": {
        "Random": (-0.74, -0.36, 0.12),
        "Cheapest": (-0.58, -0.56, -0.40),
        "Cost Rand": (-0.38, -0.39, -0.22),
        "D-opt": (0.71, 0.80, 0.77),
        "V-opt": (0.58, 0.83, 0.85),
        "Ours (MSPE)": (0.73, 0.85, 0.86),
        "All Data": (0.79, 0.79, 0.79),
    },
    "farseer_scaling_law": {
        "Random": (-0.77, 0.78, 0.79),
        "Cheapest": (-0.89, 0.41, 0.68),
        "Cost Rand": (-0.25, 0.56, 0.74),
        "D-opt": (-0.11, 0.49, 0.87),
        "V-opt": (0.67, 0.87, 0.92),
        "Ours (MSPE)": (0.60, 0.88, 0.93),
        "All Data": (0.91, 0.91, 0.91),
    },
}


# ----------------------------------------------------------------------------- the laws, in log loss


def _log_of(q: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(q, TINY))


def _farseer(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """theta: E, s, q, S, B, b, Q, A, a; x: N, D."""
    e, s, q, big_s, b_coef, b, big_q, a_coef, a = (theta[:, i, None] for i in range(9))
    n, log_d = x[:, 0] / N_UNIT, np.log(x[:, 1])
    first = np.clip(s * n**q + big_s, -50, 50)
    decay = np.exp(np.clip(a_coef * n**a + e, -50, 50))
    second = np.clip(b_coef * n**b + big_q - decay * log_d, -50, 50)
    return np.logaddexp(first, second)


def _muennighoff(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """theta: log A, log B, C, log tau_N, log tau_D, alpha, log rho; x: U, N, D."""
    log_a, log_b, c, log_tn, log_td, alpha, log_rho = (theta[:, i, None] for i in range(7))
    u, n, d = x[:, 0], x[:, 1], x[:, 2]
    tau_n, tau_d = np.exp(log_tn), np.exp(log_td)
    r_d = np.maximum(d / u - 1.0, 0.0)
    u_n = np.minimum(np.exp(log_rho) * u, n)
    r_n = np.maximum(n / u_n - 1.0, 0.0)
    eff_n = u_n * (1.0 + tau_n * -np.expm1(-r_n / tau_n))
    eff_d = u * (1.0 + tau_d * -np.expm1(-r_d / tau_d))
    terms = np.logaddexp(log_a - alpha * np.log(eff_n), log_b - alpha * np.log(eff_d))
    return _log_of(np.exp(terms) + c)


def _geomean(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """theta: log A, alpha, log B, beta, E, gamma; x: U, N, D."""
    log_a, alpha, log_b, beta, e, gamma = (theta[:, i, None] for i in range(6))
    log_u, log_n, log_d = (np.log(x[:, i]) for i in range(3))
    log_eff_d = gamma * log_u + (1.0 - gamma) * log_d
    terms = np.logaddexp(log_a - alpha * log_n, log_b - beta * log_eff_d)
    return _log_of(np.exp(terms) + e)


def _uniform_starts(lower: tuple[float, ...], upper: tuple[float, ...], count: int = 4096):
    """``count`` starts drawn uniformly in the box (fixed seed: the grid is the law's, not the run's)."""
    lo, hi = np.array(lower), np.array(upper)

    def starts(x: np.ndarray, log_q: np.ndarray) -> np.ndarray:
        return lo + (hi - lo) * np.random.default_rng(7).random((count, len(lo)))

    return starts


def _law(name: str, formula: str, inputs, params, fn, bounds) -> Law:
    lower, upper = tuple(b[0] for b in bounds), tuple(b[1] for b in bounds)
    return Law(name, formula, tuple(inputs), tuple(params), fn, _uniform_starts(lower, upper), lower, upper)


FARSEER = _law(
    "farseer",
    "L = exp(s n^q + S) + exp(B n^b + Q) D^(-exp(A n^a + E)), n = N / 1e9",
    ("N", "D"),
    ("E", "s", "q", "S", "B", "b", "Q", "A", "a"),
    _farseer,
    [(-10, 3), (-5, 5), (0.01, 1.0), (-3, 2), (0, 100), (-1.0, -0.001), (-20, 40), (-10, 10), (0.001, 1.0)],
)
MUENNIGHOFF = _law(
    "muennighoff",
    "L = A / N'^alpha + B / D'^alpha + C (effective N', D' saturating in repetitions)",
    ("U", "N", "D"),
    ("log A", "log B", "C", "log tau_N", "log tau_D", "alpha", "log rho"),
    _muennighoff,
    [
        (-5, 35),
        (-5, 35),
        (-3, 10),
        (math.log(1e-3), math.log(500)),
        (math.log(1e-3), math.log(500)),
        (0.05, 2.0),
        (math.log(1e-3), math.log(100)),
    ],
)
GEOMEAN = _law(
    "dc_geomean",
    "L = A / N^alpha + B / (U^gamma D^(1-gamma))^beta + E",
    ("U", "N", "D"),
    ("log A", "alpha", "log B", "beta", "E", "gamma"),
    _geomean,
    [(-5, 35), (0.05, 2.0), (-5, 35), (0.05, 2.0), (-3, 10), (0.0, 1.0)],
)


@dataclass(frozen=True)
class Task:
    name: str
    columns: dict[str, str]  # the law's input -> the parquet column
    laws: tuple[Law, ...]


TASKS = {
    "farseer_scaling_law": Task("farseer_scaling_law", {"N": "N", "D": "D"}, (FARSEER,)),
    "data_constrained_scaling_law": Task(
        "data_constrained_scaling_law",
        {"U": "unique_tokens", "N": "params", "D": "tokens"},
        (MUENNIGHOFF, GEOMEAN),
    ),
}


# ----------------------------------------------------------------------------- data


def load(data: Path, task: Task) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool, target region): columns N, D (and U), loss, cost (6 N D) and candidate."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise SystemExit("reading ScaleBench's parquet files needs pyarrow: pip install pyarrow") from None
    frames = []
    for split in ("train", "test"):
        files = sorted((data / task.name).glob(f"{split}-*.parquet"))
        if not files:
            raise SystemExit(
                f"{data / task.name}: no {split}-*.parquet (give --data benchmark/dataset of active-sl)"
            )
        raw = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        frame = pd.DataFrame({k: raw[c].astype(float) for k, c in task.columns.items()})
        frame["loss"] = raw["loss"].astype(float)
        frame["cost"] = 6.0 * frame["N"] * frame["D"]
        frame["candidate"] = [f"{split}{i}" for i in range(len(frame))]
        frames.append(frame)
    return frames[0], frames[1]


def targets_of(region: pd.DataFrame) -> list[Target]:
    extra = [c for c in region.columns if c not in ("N", "D", "loss", "cost", "candidate")]
    return [
        Target(f"target {i}", float(r.N), float(r.D), extra={c: float(getattr(r, c)) for c in extra})
        for i, r in enumerate(region.itertuples())
    ]


def r2(truth: np.ndarray, pred: np.ndarray) -> float:
    """ScaleBench's score: R^2 of the losses, clipped to [-1, 1] (-1 for a prediction that is not finite)."""
    if not np.all(np.isfinite(pred)):
        return -1.0
    total = float(((truth - truth.mean()) ** 2).sum())
    return float(np.clip(1.0 - ((truth - pred) ** 2).sum() / total, -1.0, 1.0))


# ----------------------------------------------------------------------------- one repeat


def point_fit(
    law: Law, x: np.ndarray, log_q: np.ndarray, warm: list[np.ndarray], top: int = 32
) -> np.ndarray:
    """Least squares on log loss from the ``top`` best starts of the law's grid and the warm starts."""
    grid = law.starts(x, log_q)
    with np.errstate(all="ignore"):
        sse = ((law.log_predict(grid, x) - log_q) ** 2).sum(axis=1)
    sse = np.where(np.isfinite(sse), sse, np.inf)
    starts = np.vstack([grid[np.argsort(sse)[:top]], *[w[None] for w in warm]])
    fitted, cost = levenberg_marquardt(
        law, starts, x, log_q, np.ones((len(starts), len(log_q))), max_iter=200
    )
    return fitted[int(np.argmin(cost))]


def warm_law(law: Law, warm: np.ndarray) -> Law:
    """``law`` whose starting grid leads with ``warm`` (the last fit): predict_targets' best_start
    then refines it first, and each resample may restart from it."""
    grid = law.starts

    def starts(x: np.ndarray, log_q: np.ndarray) -> np.ndarray:
        return np.vstack([warm[None], grid(x, log_q)])

    return replace(law, starts=starts, restarts=lambda theta, x, log_q: np.stack([theta, warm]))


def one_repeat(job: tuple) -> dict:
    task_name, law_name, data, repeat, n_bootstrap, rounds, cost_power, trim, method = job
    task = TASKS[task_name]
    law = next(lw for lw in task.laws if lw.name == law_name)
    pool, region = load(Path(data), task)
    targets = targets_of(region)
    inputs = list(law.inputs)
    total = float(pool["cost"].sum())
    rng = np.random.default_rng(repeat)
    n_seed = math.ceil(2.5 * len(law.params))
    cheapest = np.argsort(pool["cost"].to_numpy())[: 3 * n_seed]
    while True:  # a law needs two distinct values of each input (the cheapest runs may share a U)
        bought = [int(i) for i in rng.choice(cheapest, n_seed, replace=False)]
        if all(pool[name].iloc[bought].nunique() >= 2 for name in inputs):
            break
    warm: list[np.ndarray] = []
    out = {"task": task_name, "law": law_name, "method": method, "repeat": repeat}

    kept = list(bought)  # the runs the law is fitted to: all bought, less those ``trim`` drops

    def observed() -> pd.DataFrame:
        rows = pool.iloc[kept]
        return rows[inputs].assign(quantity=rows["loss"].to_numpy(), run_id=rows["candidate"].to_numpy())

    def fit_now() -> np.ndarray:
        x, log_q = pool.iloc[bought][inputs].to_numpy(float), np.log(pool.iloc[bought]["loss"].to_numpy())
        theta = point_fit(law, x, log_q, warm[-1:])
        kept[:] = bought
        if trim:
            residual = np.abs(log_q - law.log_predict(theta[None], x)[0])
            inside = residual <= trim * 1.4826 * np.median(residual)
            if (~inside).any() and inside.sum() > len(law.params) + 1:
                kept[:] = [i for i, keep in zip(bought, inside, strict=True) if keep]
                theta = point_fit(law, x[inside], log_q[inside], [theta])
        warm.append(theta)
        return theta

    for k, c in enumerate(CHECKPOINTS):
        limit = c * total
        while method == "random":  # the control: a random affordable run at a time, as the paper's Random
            left = limit - float(pool["cost"].iloc[bought].sum())
            affordable = [i for i in pool.index if i not in bought and pool.at[i, "cost"] <= left]
            if not affordable:
                break
            bought.append(int(rng.choice(affordable)))
        for r in range(rounds if method == "advisor" else 0):
            left = limit - float(pool["cost"].iloc[bought].sum())
            if left <= 0:
                break
            theta = fit_now()
            candidates = pool.drop(index=bought)
            candidates = candidates[candidates["cost"] <= left]
            if not len(candidates):
                break
            try:
                study = predict_targets(
                    observed(),
                    targets,
                    law=warm_law(law, theta),
                    n_bootstrap=n_bootstrap,
                    seed=1000 * repeat + 10 * k + r,
                )
                chosen = advise(
                    observed(),
                    candidates,
                    targets,
                    left / (rounds - r),
                    law=law,
                    study=study,
                    cost_power=cost_power,
                ).chosen
            except FitError as exc:
                print(f"{task_name}/{law_name} repeat {repeat} at {c:.0%}: {exc}", file=sys.stderr)
                break
            if not len(chosen):
                continue
            index = pool.index[pool["candidate"].isin(chosen["candidate"])]
            bought += [int(i) for i in index]
        theta = fit_now()
        pred = np.exp(law.log_predict(theta[None], region[inputs].to_numpy(float))[0])
        out[c] = r2(region["loss"].to_numpy(), pred)
        out[f"spent {c}"] = float(pool["cost"].iloc[bought].sum()) / total
        out[f"runs {c}"] = len(bought)
    return out


def all_data(task: Task, law: Law, data: str) -> float:
    """R^2 of the law fitted to the whole pool (the paper's All Data row, for our fit)."""
    pool, region = load(Path(data), task)
    inputs = list(law.inputs)
    theta = point_fit(law, pool[inputs].to_numpy(float), np.log(pool["loss"].to_numpy()), [], top=64)
    return r2(
        region["loss"].to_numpy(), np.exp(law.log_predict(theta[None], region[inputs].to_numpy(float))[0])
    )


# ----------------------------------------------------------------------------- the table


def table(results: pd.DataFrame, alls: dict[tuple[str, str], float]) -> str:
    lines = []
    for task_name, paper in PAPER.items():
        mine = results[results["task"] == task_name]
        if not len(mine):
            continue
        lines.append(f"\n{task_name}: target-region R^2 at 1% / 5% / 10% of the pool's cost (mean +- std)")
        for method, values in paper.items():
            lines.append(f"  {'paper ' + method:<34}" + "".join(f"{v:>15.2f}" for v in values))
        for (law_name, method), rows in mine.groupby(["law", "method"], sort=False):
            cells = "".join(f"{rows[c].mean():>8.2f} +- {rows[c].std(ddof=0):.2f}" for c in CHECKPOINTS)
            lines.append(f"  {method + ', ' + law_name + f' ({len(rows)} repeats)':<34}{cells}")
            spent = " / ".join(f"{rows[f'spent {c}'].mean():.3%}" for c in CHECKPOINTS)
            runs = " / ".join(f"{rows[f'runs {c}'].mean():.0f}" for c in CHECKPOINTS)
            lines.append(f"  {'   spent, runs bought':<34}{spent:>45}   ({runs} runs)")
            lines.append(f"  {'all data, ' + law_name:<34}{alls[(task_name, law_name)]:>15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="ScaleBench's benchmark/dataset directory")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--laws", nargs="+", default=None, help="only these laws (by name)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples per advisor round")
    parser.add_argument("--rounds", type=int, default=3, help="advisor rounds per checkpoint")
    parser.add_argument(
        "--cost-power",
        type=float,
        default=0.5,
        help="advise's cost_power: gain / cost^p (1: per unit of cost, advise's default; 0.5 here)",
    )
    parser.add_argument(
        "--trim",
        type=float,
        default=0.0,
        help="fit without runs whose |log residual| exceeds this many robust stds (0: keep all)",
    )
    parser.add_argument(
        "--method",
        choices=("advisor", "random"),
        default="advisor",
        help="random: the control, same seed design",
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--csv", type=Path, default=None, help="also write every repeat's row here")
    args = parser.parse_args(argv)
    start = time.time()
    jobs, alls = [], {}
    for name in args.tasks:
        for law in TASKS[name].laws:
            if args.laws and law.name not in args.laws:
                continue
            alls[(name, law.name)] = all_data(TASKS[name], law, str(args.data))
            jobs += [
                (
                    name,
                    law.name,
                    str(args.data),
                    r,
                    args.bootstrap,
                    args.rounds,
                    args.cost_power,
                    args.trim,
                    args.method,
                )
                for r in range(args.repeats)
            ]
    run: Callable = map
    if args.workers > 1:
        run = ProcessPoolExecutor(args.workers).map
    rows = []
    for row in run(one_repeat, jobs):
        rows.append(row)
        cells = " / ".join(f"{row[c]:.2f}" for c in CHECKPOINTS)
        print(f"{row['task']} {row['law']} repeat {row['repeat']}: {cells}", file=sys.stderr, flush=True)
    results = pd.DataFrame(rows)
    if args.csv:
        results.to_csv(args.csv, index=False)
    print(table(results, alls))
    print(
        f"\n{args.repeats} repeats, {args.bootstrap} resamples, {args.rounds} rounds per checkpoint, "
        f"cost_power {args.cost_power:g}, trim {args.trim:g}: {time.time() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
