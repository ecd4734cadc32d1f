"""The report's data: the study's settings, what every analysis reads (``Study``), what each
returns (``AnalysisResult``), and the whole ``Report`` that report.py builds and render.py writes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from nepa_scale.errors import UsageError
from nepa_scale.scaling import D_KINDS, N_KINDS, figures
from nepa_scale.scaling.collect import DEFAULT_WINDOW, check_window
from nepa_scale.scaling.quantities import label, short_label


@dataclass
class StudySettings:
    # auto: the linear-probe error when most completed runs measured it online (the others are named
    # and left out), else the kNN error, else (with a warning) the held-out NEPA loss; or any
    # positive column of the table
    quantity: str = "auto"
    n_kind: str = "params"
    d_kind: str = "images"
    convention: str = "6N+attn"
    budgets: list[float] | None = None  # extra table rows at these training FLOPs (mid-run points)
    window: int = DEFAULT_WINDOW
    n_bootstrap: int = 1000
    seed: int = 0
    holdout_largest: int = 1
    downstream: list[str] = field(default_factory=list)
    # FLOPs where the frontier fit starts; None: the end of the initial plateau (analyses.PLATEAU_DROP)
    frontier_from: float | None = None
    # What the study predicts (target.Target); None: the targets recorded in the study's study.json
    targets: list | None = None

    def __post_init__(self) -> None:
        """Settings no report can use: one line naming the option, before any run is read."""
        check_window(self.window)
        if self.n_bootstrap < 0:
            raise UsageError(
                f"--bootstrap: the resamples of the intervals, 0 or more, got {self.n_bootstrap}"
            )
        for option, values in (("--budgets", self.budgets or []), ("--frontier-from", [self.frontier_from])):
            bad = [v for v in values if v is not None and not 0 < v < math.inf]
            if bad:
                raise UsageError(f"{option}: training FLOPs, positive numbers, got {bad[0]:g}")


@dataclass
class Report:
    settings: StudySettings
    quantity: str  # the fitted column
    table: pd.DataFrame
    analyses: dict[str, AnalysisResult]
    warnings: list[str]
    conventions: dict[str, str]
    summary: list[str]  # what the study shows, in a few lines
    transfer: list[str]
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def fits(self) -> dict[str, dict[str, Any]]:
        return {name: a.entry for name, a in self.analyses.items() if a.entry is not None}

    @property
    def figures(self) -> dict[str, Path]:
        return {name: path for a in self.analyses.values() for name, path in a.figures.items()}

    def fit(self, name: str):
        """The fit object of an analysis (None when it did not run or was not identified)."""
        return self.analyses[name].fit if name in self.analyses else None

    def to_json(self) -> dict[str, Any]:
        out = {
            "settings": self.settings.__dict__
            | {"quantity": self.quantity, "targets": [t.to_dict() for t in self.settings.targets or []]},
            "summary": self.summary,
            "fits": self.fits,
            "warnings": self.warnings,
            "conventions": self.conventions,
        }
        return out | ({"transfer": self.transfer} if self.transfer else {})


@dataclass
class Study:
    """What every analysis reads: the settings, the tidy table (``done``: completed runs with the
    fit's columns N, D, compute, quantity; ``final``: their final points), the training-loss curves
    and every evaluation point."""

    settings: Any  # report.StudySettings
    quantity: str  # the fitted column
    done: pd.DataFrame
    final: pd.DataFrame
    curves: pd.DataFrame
    evaluations: pd.DataFrame
    fig_dir: Path

    @property
    def quantity_label(self) -> str:
        return label(self.quantity)

    @property
    def quantity_short(self) -> str:
        return short_label(self.quantity)

    @property
    def n_label(self) -> str:
        return N_KINDS[self.settings.n_kind]

    @property
    def d_label(self) -> str:
        return D_KINDS[self.settings.d_kind]

    def figure(self, fig, name: str) -> dict[str, Path]:
        return {name: figures.save(fig, self.fig_dir, name)["png"]}


@dataclass
class AnalysisResult:
    entry: dict[str, Any] | None = None  # what fits.json holds under this step's name
    fit: Any = None  # the fit object, for callers that draw or predict with it
    figures: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
