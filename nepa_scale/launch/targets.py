"""A study's target: the model and training budget it exists to predict.

In a sweep file::

    target:                    # or a list of such entries
      model: nepa_h14          # a zoo model (nepa_scale/models/zoo.py)
      overrides: {}            # optional: architecture overrides, as model.overrides
      epochs: 800              # exactly one of images, epochs, flops (training FLOPs, the
                               # study's budget.flop_convention)
      label: H/14 800 ep       # optional: how tables name it

and on the command line ``MODEL:KIND=VALUE`` (``nepa_h14:epochs=800``). The target is trained with
the study's own recipe (its base config and ``set``); launch/advice.py resolves it into N, D and the
planner's GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nepa_scale.errors import ConfigError
from nepa_scale.models.zoo import list_models

BUDGET_KINDS = ("images", "epochs", "flops")
TARGET_KEYS = {"model", "overrides", "label", *BUDGET_KINDS}


@dataclass(frozen=True)
class TargetSpec:
    model: str
    kind: str  # images | epochs | flops
    value: float
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        unit = {"images": "images", "epochs": "epochs", "flops": "FLOPs"}[self.kind]
        changed = ",".join(f"{k}={v}" for k, v in self.overrides.items())  # two targets may share a model
        model = f"{self.model}({changed})" if changed else self.model
        return self.label or f"{model} @ {self.value:,.4g} {unit}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, self.kind: self.value}
        if self.overrides:
            out["overrides"] = dict(self.overrides)
        if self.label:
            out["label"] = self.label
        return out


def _positive(value: Any, where: str) -> float:
    """A positive finite number; YAML 1.1 reads ``1e9`` as a string, so numeric strings count."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{where}: expected a positive number, got {value!r}")
    return number


def target_spec(entry: Any, where: str) -> TargetSpec:
    """One target entry checked: a zoo model and exactly one positive budget."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping like {{model: nepa_h14, epochs: 800}}, got {entry!r}")
    unknown = sorted(set(entry) - TARGET_KEYS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(TARGET_KEYS))})")
    model = entry.get("model")
    if model not in list_models():
        raise ConfigError(f"{where}.model: unknown model {model!r} (choose from {', '.join(list_models())})")
    budgets = [kind for kind in BUDGET_KINDS if entry.get(kind) is not None]
    if len(budgets) != 1:
        raise ConfigError(
            f"{where}: give exactly one budget of {', '.join(BUDGET_KINDS)}, got {len(budgets)}"
        )
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}.overrides: expected a mapping of architecture overrides")
    kind = budgets[0]
    value = _positive(entry[kind], f"{where}.{kind}")
    return TargetSpec(str(model), kind, value, dict(overrides), str(entry.get("label") or ""))


def parse_targets(spec: Any, path: Path | str) -> tuple[TargetSpec, ...]:
    """A sweep file's ``target:`` (one mapping or a list of them)."""
    if spec is None:
        return ()
    entries = spec if isinstance(spec, list) else [spec]
    if not entries:
        raise ConfigError(f"{path}: target: expected a mapping or a non-empty list of them")
    where = [f"{path}: target" if len(entries) == 1 else f"{path}: target[{i}]" for i in range(len(entries))]
    return tuple(target_spec(entry, w) for entry, w in zip(entries, where, strict=True))


def parse_target_option(text: str) -> TargetSpec:
    """``--target MODEL:KIND=VALUE`` (e.g. ``nepa_h14:epochs=800``)."""
    model, _, budget = text.partition(":")
    kind, _, value = budget.partition("=")
    if not model or not value or kind not in BUDGET_KINDS:
        raise ConfigError(
            f"--target {text!r}: expected MODEL:KIND=VALUE with KIND one of {', '.join(BUDGET_KINDS)}, "
            "e.g. nepa_h14:epochs=800"
        )
    return target_spec({"model": model, kind: value}, f"--target {text}")
