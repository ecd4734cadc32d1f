"""Which of a study's runs one fit may take together, and which runs it leaves out, by name.

A scaling law compares runs that differ in size and length and in nothing that changes what is
measured. A run of another task, or trained and evaluated on other data (another dataset, folder or
splits, another image size), measures something else. So the study is the largest group of
completed runs that agree on the task and the data; every run outside it (any status) is named and
left out of the fits, its rows kept in the table. Two groups of equal size are refused: neither is
the study, and a fit of one chosen by the order of the folders would be a silent choice.

The fitted quantity is the one most runs measured (``quantities.resolve_quantity``); the runs that
did not measure it are named and left out, never the reason everyone's quantity changes. A probe's
error is comparable only between runs that probed alike (k, attention, weights): the runs that
probed otherwise than most are named and left out too. (Runs that probed different image subsets
are named by report.load_study.)
"""

from __future__ import annotations

from collections import Counter

import pandas as pd

from nepa_scale.errors import FitError
from nepa_scale.scaling.quantities import AUTO_ORDER

STUDY_KEYS = ("task", "data")  # the table's columns that must agree for runs to share one fit
ATTACHED_COUNTS = {"ft_error": "ft_runs", "ft_acc": "ft_runs", "seg_error": "seg_runs", "miou": "seg_runs"}


def _names(ids) -> str:
    return ", ".join(sorted(ids))


def _largest(counts: Counter, what: str) -> tuple:
    """The key most runs share; an even split between the largest groups is a FitError naming them."""
    ranked = counts.most_common()
    tied = [key for key, n in ranked if n == ranked[0][1]]
    if len(tied) > 1:
        groups = "; ".join(f"{ranked[0][1]} on {_describe(key)}" for key in tied)
        raise FitError(
            f"the completed runs split evenly between {len(tied)} {what} ({groups}): no group is the study; "
            "report each study's folder on its own"
        )
    return ranked[0][0]


def _describe(key) -> str:
    if isinstance(key, str):
        return key
    task, data = key
    return data if task == "pretrain" else f"{data} ({task})"


def incomparable_runs(table: pd.DataFrame) -> tuple[dict[str, str], list[str]]:
    """Every run (any status) whose task or data differ from the study's (the largest group of
    completed runs): run id -> why, and one warning per group left out."""
    if not set(STUDY_KEYS) <= set(table.columns):
        return {}, []
    runs = table.drop_duplicates("run_id").dropna(subset=list(STUDY_KEYS))
    keys = pd.Series(list(zip(*(runs[k] for k in STUDY_KEYS), strict=True)), index=runs.index)
    counts = Counter(keys[runs["status"] == "completed"])
    if not counts:
        return {}, []
    study = _largest(counts, "tasks or data sets")
    left_out, warnings = {}, []
    for key in sorted(set(keys) - {study}):
        ids = runs.loc[keys == key, "run_id"]
        why = f"on {_describe(key)}, not on the study's {_describe(study)} ({counts[study]} completed runs)"
        left_out |= dict.fromkeys(ids, why)
        warnings.append(f"{len(ids)} run(s) {why}: not comparable, left out of the fits: {_names(ids)}")
    return left_out, warnings


def runs_without(final: pd.DataFrame, quantity: str) -> tuple[set[str], list[str]]:
    """The completed runs a fit of ``quantity`` leaves out, named: those that did not measure it (no
    online probes, no attached fine-tune) and, for a probe's error, those that probed otherwise than
    most runs did. ``final``: one row per completed run."""
    left_out, warnings = set(), []
    measured = final[quantity].notna() if quantity in final else pd.Series(False, index=final.index)
    if quantity.startswith("probe_") and "probe" in final:
        missing = final[~measured & final["probe"].isna()]
        if len(missing):
            left_out |= set(missing["run_id"])
            warnings.append(
                f"{len(missing)} of {len(final)} runs have no {quantity} (they ran without online probes, "
                f"logging.probe_every: 0): left out of the fits: {_names(missing['run_id'])}"
            )
        probed = final[measured & final["probe"].notna()]
        if probed["probe"].nunique() > 1:
            setup = _largest(Counter(probed["probe"]), "probe settings")
            other = probed[probed["probe"] != setup]
            left_out |= set(other["run_id"])
            warnings.append(
                f"{len(other)} run(s) probed otherwise ({'; '.join(sorted(set(other['probe'])))}) than the "
                f"study's {(probed['probe'] == setup).sum()} ({setup}): their {quantity} is not comparable, "
                f"left out of the fits: {_names(other['run_id'])}"
            )
    count = ATTACHED_COUNTS.get(quantity)
    if count is not None and count in final:
        missing = final[~measured & (final[count] == 0)]
        if len(missing):
            left_out |= set(missing["run_id"])
            warnings.append(
                f"{len(missing)} of {len(final)} runs have no {quantity} (no completed attached fine-tune): "
                f"left out of the fits: {_names(missing['run_id'])}"
            )
    return left_out, warnings


def preferred_but_rare(final: pd.DataFrame, quantity: str) -> list[str]:
    """For ``--quantity auto``: each quantity it prefers to ``quantity`` that some runs measured, but
    not most of them, with those runs named (what a fit of it alone would take)."""
    if quantity not in AUTO_ORDER:
        return []
    warnings = []
    for column in AUTO_ORDER[: AUTO_ORDER.index(quantity)]:
        if column in final and final[column].notna().any():
            ids = final.loc[final[column].notna(), "run_id"]
            warnings.append(
                f"{column}: measured by {len(ids)} of {len(final)} runs, not most of them, so the fits take "
                f"{quantity} (`--quantity {column}` fits those runs alone): {_names(ids)}"
            )
    return warnings
