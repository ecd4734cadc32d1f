"""Sweeps: a base run config, axes over it, and a cluster profile -> runs with stable ids.

    name: demo                         # default: the file's stem
    base: ../configs/digits_tiny.yaml  # a run config (path relative to this file) or a mapping
    set: {logging.log_every: 10}       # dotted overrides for every run
    axes:                              # blocks multiply; inside a block:
      - grid: {model.overrides.dim: [32, 64, 128]}       #   grid: every combination
      - zip: {budget.images: [...], optim.lr: [...]}     #   zip: the i-th values together
    profile: local                     # slurm/profiles/NAME.yaml or a path
    resources: {time_min: 30}          # profile overrides for every run
    output_root: runs/demo             # run directories: <output_root>/<run id>

Axis keys under ``resources.`` (e.g. ``resources.nodes``) set the profile per run. A run's id is
a readable slug of its axis values plus a hash of its resolved config (output directory and
resources excluded): the same spec gives the same ids, and changing one run's config changes only
that run's id. Configs are validated here, so a typo fails at ``plan`` with the key it names.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nepa_scale.config import (
    ConfigError,
    RunConfig,
    check_world,
    config_from_dict,
    parse_override,
    read_yaml_mapping,
    set_dotted,
)
from nepa_scale.launch.profiles import ClusterProfile, load_profile

SWEEP_KEYS = {"name", "description", "base", "set", "axes", "profile", "resources", "output_root"}
RESOURCE_PREFIX = "resources."
UNHASHED = ("output_dir",)  # where a run lives does not change what it computes


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    values: dict[str, Any]  # the axis values that make this run
    config_data: dict[str, Any]  # resolved config as a mapping (output_dir set)
    config: RunConfig | None  # None when the config is invalid
    resources: ClusterProfile
    error: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config_data["output_dir"])


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    output_root: Path
    profile_name: str
    runs: list[PlannedRun]

    def run(self, run_id: str) -> PlannedRun:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise ConfigError(
            f"sweep {self.name}: no run '{run_id}' (runs: {', '.join(r.run_id for r in self.runs)})"
        )


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; keys already dotted stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not dotted.endswith(("overrides", "extra", "sbatch_extra")):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _axis_block(block: Any, index: int) -> list[dict[str, Any]]:
    where = f"axes[{index}]"
    if not isinstance(block, dict) or len(block) != 1 or next(iter(block)) not in ("grid", "zip"):
        raise ConfigError(f"{where}: each block is {{grid: {{key: [values]}}}} or {{zip: {{key: [values]}}}}")
    kind, keys = next(iter(block.items()))
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(f"{where}.{kind}: expected a mapping of dotted keys to lists of values")
    for key, values in keys.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}.{key}: expected a non-empty list of values, got {values!r}")
    names = list(keys)
    if kind == "grid":
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*keys.values())]
    lengths = {key: len(values) for key, values in keys.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{where}.zip: lists must have equal lengths, got {lengths}")
    return [dict(zip(names, combo, strict=True)) for combo in zip(*keys.values(), strict=True)]


def _format_value(value: Any) -> str:
    """Compact: 2e-3 -> 0.002, 12811670 -> 12.8M."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= scale:
                return f"{value / scale:.3g}{unit}"
    return str(value)


def run_slug(values: dict[str, Any]) -> str:
    """A readable prefix for the run id: the axis values (booleans by their key, when on)."""
    parts = []
    for key, value in values.items():
        if key.startswith(RESOURCE_PREFIX):
            continue
        short = key.split(".")[-1]
        if isinstance(value, bool):
            parts.append(short if value else "")
        else:
            parts.append(_format_value(value) if short == "name" else f"{short}{_format_value(value)}")
    parts = [part for part in parts if part]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-_.")
    return slug[:60] or "run"


def run_id_digest(data: dict[str, Any]) -> str:
    """The short hash that ends a run id: the run's config, less what cannot change its result."""
    hashed = {k: v for k, v in data.items() if k not in UNHASHED}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _base_config(spec: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    base = spec.get("base", {})
    if isinstance(base, str):
        return read_yaml_mapping(sweep_dir / base, "base config")
    if not isinstance(base, dict):
        raise ConfigError("base: expected a config file path or a mapping")
    return copy.deepcopy(base)


def load_sweep(
    path: str | Path,
    executor: str | None = None,
    output_root: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Sweep:
    """Expand a sweep file into its runs. ``executor`` overrides the profile's (slurm | local);
    ``overrides`` (``key=value``, e.g. ``data.root=/data/imagenet``) extend the sweep's ``set``."""
    path = Path(path)
    spec = read_yaml_mapping(path, "sweep")
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(SWEEP_KEYS))})")
    name = str(spec.get("name", path.stem))
    base = _base_config(spec, path.parent)
    common = _flatten(spec.get("set") or {})
    common.update(parse_override(item, "--set") for item in overrides or [])
    axes = spec.get("axes") or []
    if not isinstance(axes, list):
        raise ConfigError(f"{path}: axes: expected a list of grid/zip blocks")
    blocks = [_axis_block(block, i) for i, block in enumerate(axes)]
    profile_name = str(spec.get("profile", "local"))
    sweep_resources = dict(spec.get("resources") or {})
    if executor is not None:
        sweep_resources["executor"] = executor
    root = Path(output_root or spec.get("output_root") or f"runs/{name}").absolute()

    runs: list[PlannedRun] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*blocks) if blocks else [()]:
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        resources = dict(sweep_resources)
        data = copy.deepcopy(base)
        for key, value in {**common, **values}.items():
            if key.startswith(RESOURCE_PREFIX):
                resources[key[len(RESOURCE_PREFIX) :]] = value
            else:
                set_dotted(data, key, value)
        profile = load_profile(profile_name, resources, relative_to=path.parent)
        config, error = None, None
        try:
            config = config_from_dict(data)
            check_world(config, profile.world_size)
            data = config.to_dict()
        except ConfigError as exc:
            error = str(exc)
        run_id = f"{run_slug(values)}-{run_id_digest(data)}"
        if run_id in seen:
            raise ConfigError(
                f"{path}: runs {seen[run_id]} and {values} resolve to the same config (id {run_id})"
            )
        seen[run_id] = values
        data["output_dir"] = str(root / run_id)
        if config is not None:
            config.output_dir = data["output_dir"]
        runs.append(PlannedRun(run_id, values, data, config, profile, error))
    return Sweep(name, path, root, profile_name, runs)
