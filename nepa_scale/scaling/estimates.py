"""What every fit reports: an ``Estimate`` (a number, its 95% bootstrap interval, whether the data
identify it) and the helpers the fits share: cleaning the points, intervals from resamples, and the
parallel bootstrap over SeedSequence-spawned chunks.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

EXPONENT_BOUNDS = (0.0, 5.0)  # the L-BFGS-B bounds of every fitted exponent
MAX_INTERVAL_RATIO = 10.0  # a 95% interval wider than this factor (high / low) is not a result
# Beyond these ratios (high / low) a factor is no longer a number people read: 3.42e+04 becomes
# "about 5 orders of magnitude", and anything past a million-fold "many orders of magnitude".
FACTOR_IN_WORDS = 100.0
MANY_DECADES = 6


@dataclass
class Estimate:
    """A fitted number, its 95% bootstrap interval, and whether the data identify it.

    A parameter at a bound of its search, with an interval spanning more than a factor of
    ``MAX_INTERVAL_RATIO``, with an interval of zero width (the resamples cannot move it: pinned),
    or without an interval is not identified: reports show the reason instead of the number."""

    value: float
    low: float = math.nan  # 95% bootstrap interval
    high: float = math.nan
    identified: bool = True
    reason: str = ""

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def __str__(self) -> str:
        if not self.identified:
            return f"not identified ({self.reason})"
        if not self.has_interval:
            return human(self.value)
        return f"{human(self.value)} [{human(self.low)}, {human(self.high)}]"

    def to_dict(self) -> dict:
        """Plain numbers for fits.json (NaN as null)."""

        def number(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "value": number(self.value),
            "low": number(self.low),
            "high": number(self.high),
            "identified": self.identified,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Estimate:
        def number(x) -> float:
            return math.nan if x is None else float(x)

        return cls(
            number(data["value"]),
            number(data.get("low")),
            number(data.get("high")),
            bool(data.get("identified", True)),
            str(data.get("reason", "")),
        )


def human(x: float) -> str:
    """A number for people: 4 significant digits, no numpy repr (``np.float64(403712.0)``)."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == int(x) and abs(x) < 1e6:
        return f"{int(x):,}"
    return f"{x:.4g}"


def interval_spread(low: float, high: float) -> str:
    """How far apart an interval's ends are, for people: a factor while it reads as one, then orders
    of magnitude in words (never "a factor of 1e+183": the number itself means nothing)."""
    ratio = high / low
    if ratio < FACTOR_IN_WORDS:
        return f"a factor of {ratio:.3g}"
    decades = math.log10(ratio)
    if decades < MANY_DECADES:
        return f"about {decades:.0f} orders of magnitude"
    return f"many orders of magnitude (more than {MANY_DECADES})"


def judged(
    estimate: Estimate,
    lower: float | None = None,
    upper: float | None = None,
    floor: float | None = None,
) -> Estimate:
    """``estimate`` with its identification decided: ``lower``/``upper`` are the bounds of the
    search, ``floor`` a value below which a non-negative parameter counts as at its bound 0."""
    reasons = []
    width = (upper - lower) if lower is not None and upper is not None else None
    tol = 1e-3 * width if width else 1e-9
    for bound, name in ((lower, "lower"), (upper, "upper")):
        if bound is None:
            continue
        if abs(estimate.value - bound) <= tol:
            reasons.append(f"at the {name} bound {human(bound)} of its search")
        elif estimate.has_interval and min(abs(estimate.low - bound), abs(estimate.high - bound)) <= tol:
            reasons.append(f"its interval reaches the {name} bound {human(bound)} of its search")
    if floor is not None and estimate.value < floor:
        reasons.append(f"at its lower bound 0 (fitted {estimate.value:.2g})")
    if not estimate.has_interval:
        reasons.append("no bootstrap interval")
    elif estimate.high == estimate.low:
        reasons.append("its interval has zero width: the resamples cannot move it (pinned)")
    elif estimate.low > 0 and estimate.high / estimate.low > MAX_INTERVAL_RATIO:
        reasons.append(f"its 95% interval spans {interval_spread(estimate.low, estimate.high)}")
    elif estimate.low <= 0 < estimate.high and lower is None:
        reasons.append("its 95% interval includes 0")
    if reasons:
        return Estimate(estimate.value, estimate.low, estimate.high, False, "; ".join(dict.fromkeys(reasons)))
    return Estimate(estimate.value, estimate.low, estimate.high)


def finite_points(*arrays: np.ndarray, names: tuple[str, ...], warnings: list[str]) -> tuple[np.ndarray, ...]:
    arrays = tuple(np.asarray(a, dtype=float) for a in arrays)
    ok = np.ones(len(arrays[0]), dtype=bool)
    for a in arrays:
        ok &= np.isfinite(a)
    ok &= arrays[-1] > 0
    dropped = int((~ok).sum())
    if dropped:
        warnings.append(f"dropped {dropped} point(s) with NaN/inf or non-positive {names[-1]}")
    return tuple(a[ok] for a in arrays)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) < 10:
        return math.nan, math.nan
    return float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def _with_one_blas_thread(job: tuple) -> list:
    """Runs ``fn(task)`` in a worker with one BLAS thread: threads on top of the processes only
    oversubscribe the cores. The limit is set here, once unpickling ``fn`` has imported its module
    (scipy loads its own OpenBLAS then); a pool initializer runs before that and misses it, which
    made the demo's Chinchilla bootstrap five times slower."""
    fn, task = job
    with threadpool_limits(1):
        return fn(task)


def _parallel_map(fn, tasks: list) -> list:
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers <= 1:
        return [fn(t) for t in tasks]
    # spawn, not fork: forked children inherit BLAS thread pools mid-state and can crawl or hang.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_with_one_blas_thread, [(fn, task) for task in tasks]))


def estimate(value: float, samples: np.ndarray | None) -> Estimate:
    """``value`` with the 95% percentile interval of its bootstrap ``samples`` (none: no interval)."""
    if samples is None or not len(samples):
        return Estimate(float(value))
    return Estimate(float(value), *_interval(np.asarray(samples, dtype=float)))


def parallel_bootstrap(worker, n_bootstrap: int, seed: int, *payload) -> list:
    """``n_bootstrap`` resamples in chunks over the cores: ``worker((seed_sequence, count, *payload))``
    returns a list of ``count`` results; the chunks' seeds are spawned from ``seed``, so the resamples
    are the same whatever the number of cores."""
    if not n_bootstrap:
        return []
    chunks = max(1, min(os.cpu_count() or 1, n_bootstrap))
    seeds = np.random.SeedSequence(seed).spawn(chunks)
    counts = [n_bootstrap // chunks + (i < n_bootstrap % chunks) for i in range(chunks)]
    tasks = [(s, c, *payload) for s, c in zip(seeds, counts, strict=True)]
    return [x for part in _parallel_map(worker, tasks) for x in part]
