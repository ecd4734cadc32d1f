"""What a NEPA study can fit, and how trustworthy each candidate is.

NEPA's targets are each model's own patch embeddings (with a stop-gradient), so two models' NEPA
losses measure two different tasks: a model whose targets contract scores a lower loss without being
better. A study therefore fits a downstream error (``resolve_quantity``: the linear-probe error
measured online, else the kNN error, else, with a warning, the held-out loss: the first that most
runs measured), and reads the loss and the label-free diagnostics as diagnostics.

``quantity_table`` measures every candidate the same way (Madaan et al. 2024): the seed-to-seed
spread at equal (N, D) (the noise floor), the width effect in standard errors of that spread, and
how monotone the quantity is, over each run's evaluation points and across budgets and widths.
``diagnostic_correlations`` gives each diagnostic's rank correlation with the fitted error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from nepa_scale.scaling.fits import seed_spread, width_effect


@dataclass(frozen=True)
class Quantity:
    label: str
    lower_is_better: bool
    kind: str  # downstream | loss | diagnostic
    short: str = ""  # for an axis or a panel title (the label says it in full)


QUANTITIES = {
    "probe_linear_error": Quantity(
        "linear-probe error (online: logistic regression on frozen mean-pooled features, fixed class-balanced subsets)",
        True,
        "downstream",
        "linear-probe error (online)",
    ),
    "probe_knn_error": Quantity(
        "kNN error (online: k = 20, cosine, temperature 0.07, fixed class-balanced subsets)",
        True,
        "downstream",
        "kNN error (online, k = 20)",
    ),
    "probe_linear_nll": Quantity(
        "linear-probe cross-entropy (online, val subset)", True, "downstream", "linear-probe cross-entropy"
    ),
    "ft_error": Quantity(
        "fine-tune error 1 - top-1 (val) of the attached classification fine-tunes",
        True,
        "downstream",
        "fine-tune error (1 - top-1)",
    ),
    "seg_error": Quantity(
        "segmentation error 1 - mIoU (val, single scale) of the attached fine-tunes",
        True,
        "downstream",
        "segmentation error (1 - mIoU)",
    ),
    "miou": Quantity(
        "mIoU (val, single scale) of the attached segmentation fine-tunes", False, "downstream", "mIoU"
    ),
    "val_cosine_distance": Quantity(
        "held-out mean cosine distance 1 + val_loss (NEPA loss)", True, "loss", "held-out 1 + val_loss"
    ),
    "cosine_distance": Quantity(
        "mean cosine distance 1 + loss (training NEPA loss, smoothed)",
        True,
        "loss",
        "training 1 + loss (smoothed)",
    ),
    "val_gap_remaining": Quantity(
        "gap remaining: 1 - the share of the gap between the better trivial predictor and a perfect "
        "prediction that the model closes (held-out)",
        True,
        "diagnostic",
        "gap remaining (1 - gap closed)",
    ),
    "rankme_features": Quantity(
        "effective rank (RankMe) of the pooled features / width",
        False,
        "diagnostic",
        "RankMe of pooled features / width",
    ),
    "rankme_targets": Quantity(
        "effective rank (RankMe) of the patch targets / width",
        False,
        "diagnostic",
        "RankMe of targets / width",
    ),
    "val_target_spread": Quantity(
        "target spread: 1 - mean pairwise cosine of an image's targets (held-out)",
        False,
        "diagnostic",
        "target spread (held-out)",
    ),
}
# What ``--quantity auto`` fits, in order of preference: the first most completed runs measured.
AUTO_ORDER = ("probe_linear_error", "probe_knn_error", "val_cosine_distance", "cosine_distance")
LOSS_WARNING = (
    "the fitted quantity is a NEPA loss: its targets are each model's own embeddings, so two models' "
    "losses measure two different tasks (a model whose targets contract scores lower without being "
    "better); fit a downstream error (logging.probe_every: online probes) and read the loss as a diagnostic"
)
MONOTONE_SHARE = 0.7  # below this share of improving consecutive points a quantity is flagged


def label(column: str) -> str:
    return QUANTITIES[column].label if column in QUANTITIES else column


def short_label(column: str) -> str:
    return QUANTITIES[column].short if column in QUANTITIES else column


def lower_is_better(column: str) -> bool:
    return QUANTITIES[column].lower_is_better if column in QUANTITIES else True


def resolve_quantity(final: pd.DataFrame, requested: str) -> tuple[str, list[str]]:
    """``auto`` -> the first of AUTO_ORDER that most (more than half) of the completed runs' final
    points have: a few runs without probes are left out of the fits by name (comparable.py), never
    the reason every run's quantity becomes another. A NEPA loss comes with the warning why it is not
    comparable across models. Returns (column, warnings)."""
    if requested != "auto":
        warnings = [LOSS_WARNING] if QUANTITIES.get(requested, Quantity("", True, "")).kind == "loss" else []
        return requested, warnings
    for column in AUTO_ORDER:
        if column in final and 2 * final[column].notna().sum() > len(final):
            return column, [LOSS_WARNING] if QUANTITIES[column].kind == "loss" else []
    return "cosine_distance", [LOSS_WARNING]


def _improves(before: float, after: float, lower: bool) -> bool:
    return after < before if lower else after > before


def share_improving(pairs: list[tuple[float, float]], lower: bool) -> float:
    """The share of (before, after) pairs where the quantity improves (NaN without pairs)."""
    pairs = [(a, b) for a, b in pairs if np.isfinite(a) and np.isfinite(b)]
    return sum(_improves(a, b, lower) for a, b in pairs) / len(pairs) if pairs else math.nan


def training_pairs(evaluations: pd.DataFrame, column: str) -> list[tuple[float, float]]:
    """Consecutive evaluation points of each run (a branch's from its branch point on, so that a
    trunk's points count once; the untrained step 0 left out: every quantity improves from it)."""
    pairs = []
    if column not in evaluations:
        return pairs
    for _, run in evaluations[evaluations["step"] > 0].groupby("run_id"):
        run = run.sort_values("step")
        values, own = run[column].to_numpy(float), run["own"].to_numpy()
        pairs += [(values[i], values[i + 1]) for i in range(len(values) - 1) if own[i + 1]]
    return pairs


def across_pairs(final: pd.DataFrame, column: str, along: str, within: str) -> list[tuple[float, float]]:
    """Consecutive seed means along ``along`` (N or D) at each value of ``within``."""
    means = final.groupby([within, along])[column].mean().reset_index()
    pairs = []
    for _, group in means.groupby(within):
        values = group.sort_values(along)[column].to_numpy(float)
        pairs += list(zip(values[:-1], values[1:], strict=True))
    return pairs


def quantity_table(final: pd.DataFrame, evaluations: pd.DataFrame, fitted: str) -> pd.DataFrame:
    """One row per candidate quantity that every completed run measured: noise floor, width effect,
    monotonicity in training, in D and in N, and the flag."""
    rows = []
    for column, quantity in QUANTITIES.items():
        if column not in final or not final[column].notna().all() or not len(final):
            continue
        values = final[column].to_numpy(float)
        lower = quantity.lower_is_better
        spread = seed_spread(final["N"], final["D"], values, final["seed"]) if (values > 0).all() else None
        effect = width_effect(final["N"], final["D"], values, spread) if spread is not None else None
        in_training = share_improving(training_pairs(evaluations, column), lower)
        in_d = share_improving(across_pairs(final, column, "D", "N"), lower)
        in_n = share_improving(across_pairs(final, column, "N", "D"), lower)
        z = math.nan if effect is None else (effect.z if lower else -effect.z)
        flags = [
            name
            for name, share in (("training", in_training), ("D", in_d), ("N", in_n))
            if np.isfinite(share) and share < MONOTONE_SHARE
        ]
        rows.append(
            {
                "quantity": column,
                "kind": "fitted" if column == fitted else quantity.kind,
                "seed std of log": spread.std_log if spread else math.nan,
                "width effect (SE)": z,
                "improves in training": in_training,
                "improves with D": in_d,
                "improves with N": in_n,
                "flag": f"not monotone in {', '.join(flags)}" if flags else "",
            }
        )
    return pd.DataFrame(rows)


def diagnostic_correlations(final: pd.DataFrame, fitted: str) -> dict[str, float]:
    """Spearman rank correlation of each diagnostic (and the NEPA losses) with the fitted quantity
    over the study's completed runs."""

    out = {}
    for column, quantity in QUANTITIES.items():
        if quantity.kind in ("diagnostic", "loss") and column != fitted and column in final:
            pair = final[[column, fitted]].dropna()
            if len(pair) >= 3 and pair[column].nunique() > 1 and pair[fitted].nunique() > 1:
                out[column] = float(spearmanr(pair[column], pair[fitted]).statistic)
    return out
