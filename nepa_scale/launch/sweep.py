"""Sweeps: a base run config, axes over it, and a cluster profile -> runs with stable ids.

    name: demo                         # default: the file's stem
    base: ../configs/digits_tiny.yaml  # a run config (path relative to this file) or a mapping
    set: {logging.log_every: 10}       # dotted overrides for every run
    axes:                              # blocks multiply; inside a block:
      - grid: {model.overrides.dim: [32, 64, 128]}       #   grid: every combination
      - zip: {budget.images: [...], optim.lr: [...]}     #   zip: the i-th values together
      - seeds: 3                                         #   seeds: seed 0, 1, 2 (or a list)
      - isoflop:                                         #   isoflop: compute budgets x model sizes,
          compute: [1.0e12, 3.0e12]                      #     each run as long as its budget (whole
          models: {model.overrides.dim: [32, 64]}        #     steps, within 1%); models: a zip
      - union: [[{zip: ...}, {seeds: 3}], [{zip: ...}]]  #   union: the runs of each list, together
    attach: {segment: {sweep: x.yaml}} # downstream fine-tunes of the runs (nepa_scale/workflows/attach.py)
    target: {model: nepa_h14, epochs: 800}  # what the study predicts (launch/targets.py); a list for several
    profile: local                     # slurm/profiles/NAME.yaml or a path
    resources: {time_min: 30}          # profile overrides for every run
    output_root: runs/demo             # run directories: <output_root>/<run id>

Axis keys under ``resources.`` (e.g. ``resources.nodes``) set the profile per run. A run's id is
a readable slug of its axis values plus a hash of what determines its result (``run_id_digest``):
the same spec gives the same ids wherever the data is mounted, and changing one run's config
changes only that run's id. Configs are validated here, so a typo fails at ``plan`` with the key
it names; missing data is a warning here and an error at launch.

WSD runs that differ only in length become one trunk and its cooldown branches
(nepa_scale/launch/design.py): the planner sets the trunk's ``checkpoint.keep_steps`` and each
branch's ``branch.parent`` and ``branch.step``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nepa_scale.config import ConfigError, RunConfig, SegmentConfig, config_from_dict
from nepa_scale.config.files import get_dotted, parse_override, pop_dotted, read_yaml_mapping, set_dotted
from nepa_scale.config.schema import yaml_number
from nepa_scale.data import check_input_paths
from nepa_scale.engine.settings import check_loggers, check_world
from nepa_scale.launch.design import check_flops_budget, check_run_schedule, plan_branches
from nepa_scale.launch.profiles import ClusterProfile, load_profile
from nepa_scale.launch.targets import TargetSpec, parse_targets

SWEEP_KEYS = {
    "name",
    "description",
    "base",
    "set",
    "axes",
    "profile",
    "resources",
    "output_root",
    "attach",
    "target",
}
RESOURCE_PREFIX = "resources."
BLOCK_KINDS = ("grid", "zip", "seeds", "isoflop", "union")
ATTACH_KEYS = {"sweep", "budgets", "per_model"}  # an attach: entry (nepa_scale/workflows/attach.py)
# Not what a run computes: where it lives, how a branch gets its start (left out of the digest),
# where its data is mounted (hashed as unset, so runs without a data.root kept their ids).
UNHASHED = ("output_dir", "branch", "checkpoint.keep_steps", "data.index_dir")
UNPACKED_RUNS = 4  # a study of this many runs reading an image folder file by file is told to pack it
BLANKED = ("data.root",)
# Settings added after run ids were first recorded enter the digest only when set, so that adding
# a setting to nepa-scale never renames the runs of a study already under way.
LATER_SETTINGS = {
    "optim.schedule": "cosine",
    "optim.warmup_steps": None,
    "optim.cooldown_fraction": 0.2,
    "optim.cooldown_shape": "1-sqrt",
    "finetune.label_fraction": 1.0,
    "checkpoint.ema_warmup": False,
    "model.compile_mode": "default",
    "model.float8": False,
    "deepspeed.overlap_comm": None,
    "deepspeed.reduce_bucket_size": None,
    "segment": SegmentConfig().model_dump(mode="json"),  # the whole section, unused
    "logging.probe_train_per_class": None,
    "logging.probe_val_per_class": None,
    "logging.probe_subset_seed": 0,
    "logging.probe_folds": None,
    "distributed": {"timeout_s": 600.0},
    "data.worker_start": None,
    "checkpoint.allow_lost_history": False,
}
# Settings removed since run ids were first recorded, hashed at the value every recorded run had.
RETIRED_SETTINGS = {"logging.probe_limit": None}


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    values: dict[str, Any]  # the axis values that make this run
    config_data: dict[str, Any]  # resolved config as a mapping (output_dir set)
    config: RunConfig | None  # None when the config is invalid
    resources: ClusterProfile
    error: str | None = None
    parent: str | None = None  # a cooldown branch: its trunk's run id
    branch_step: int | None = None  # ... and the step it starts from
    trunk_of: tuple[str, ...] = ()  # a trunk: its branches' run ids

    @property
    def run_dir(self) -> Path:
        return Path(self.config_data["output_dir"])

    @property
    def design(self) -> str:
        """trunk | branch@STEP | "" (an independent run)."""
        if self.parent is not None:
            return f"branch@{self.branch_step}"
        return "trunk" if self.trunk_of else ""


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    output_root: Path
    profile_name: str
    runs: list[PlannedRun]
    warnings: tuple[str, ...] = ()  # said once by plan and launch (e.g. data.root not there)
    attach: dict[str, dict] = dataclasses.field(default_factory=dict)  # downstream studies (attach.py)
    targets: tuple[TargetSpec, ...] = ()  # what the study is for (targets.py)
    # The file as read, with its paths made absolute, and the runs' common config (base + set): what
    # the advisor writes its sweep files from, so that the runs it proposes are planned as these are.
    spec: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

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


def _axis_block(block: Any, where: str) -> list[dict[str, Any]]:
    """The axis values of one block (see the module docstring), one mapping per run."""
    if not isinstance(block, dict) or len(block) != 1 or next(iter(block)) not in BLOCK_KINDS:
        raise ConfigError(
            f"{where}: each block is one of {', '.join(BLOCK_KINDS)} (e.g. {{grid: {{key: [values]}}}})"
        )
    kind, body = next(iter(block.items()))
    where = f"{where}.{kind}"
    if kind == "seeds":
        if isinstance(body, int) and not isinstance(body, bool) and body > 0:
            body = list(range(body))
        if not isinstance(body, list) or not body or not all(isinstance(s, int) for s in body):
            raise ConfigError(f"{where}: a number of seeds or a list of integer seeds, got {body!r}")
        return [{"seed": seed} for seed in body]
    if kind == "union":
        if not isinstance(body, list) or not body:
            raise ConfigError(f"{where}: a list of alternatives, each a block or a list of blocks")
        runs = []
        for i, part in enumerate(body):
            runs += _product(part if isinstance(part, list) else [part], f"{where}[{i}]")
        return runs
    if kind == "isoflop":
        if not isinstance(body, dict) or set(body) != {"compute", "models"}:
            raise ConfigError(f"{where}: expected {{compute: [FLOPs], models: {{key: [values]}}}}")
        compute = [yaml_number(c) for c in _values(body["compute"], f"{where}.compute")]  # 1.0e12 as 1e12
        if not all(
            isinstance(c, int | float) and not isinstance(c, bool) and 0 < c < math.inf for c in compute
        ):
            raise ConfigError(f"{where}.compute: training FLOPs per run, positive numbers, got {compute!r}")
        models = _axis_block({"zip": body["models"]}, f"{where}.models")
        lengths = {"budget.images": None, "budget.epochs": None}  # the budget alone sets the length
        return [{**lengths, "budget.flops": float(c), **model} for c in compute for model in models]
    if not isinstance(body, dict) or not body:
        raise ConfigError(f"{where}: expected a mapping of dotted keys to lists of values")
    columns = {key: _values(values, f"{where}.{key}") for key, values in body.items()}
    names = list(columns)
    if kind == "grid":
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*columns.values())]
    lengths = {key: len(values) for key, values in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{where}: lists must have equal lengths, got {lengths}")
    return [dict(zip(names, combo, strict=True)) for combo in zip(*columns.values(), strict=True)]


def _values(values: Any, where: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}")
    return values


def _product(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """Every combination of the blocks' runs (one run with no values for no blocks)."""
    expanded = [_axis_block(block, f"{where}[{i}]") for i, block in enumerate(blocks)]
    runs = []
    for combo in itertools.product(*expanded):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        runs.append(values)
    return runs


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
    """A readable prefix for the run id: the axis values (booleans by their key, when on; a path by
    its last part; an unset value as ``no-KEY``; mappings left out)."""
    parts = []
    for key, value in values.items():
        if key.startswith(RESOURCE_PREFIX):
            continue
        short = key.split(".")[-1]
        if value is None:
            parts.append(f"no-{short}")
        elif isinstance(value, str) and "/" in value:
            parts.append(f"{short}-{Path(value).name}")
        elif isinstance(value, bool):
            parts.append(short if value else "")
        elif isinstance(value, dict):  # e.g. model.overrides: left to the digest
            continue
        else:
            parts.append(_format_value(value) if short == "name" else f"{short}{_format_value(value)}")
    parts = [part for part in parts if part]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-_.")
    return slug[:60] or "run"


def run_id_digest(data: dict[str, Any]) -> str:
    """The short hash that ends a run id: the run's config, less what cannot change its result
    (``UNHASHED``, ``BLANKED``), less later settings at their defaults (``LATER_SETTINGS``), with
    retired settings at the value they had (``RETIRED_SETTINGS``)."""
    hashed = copy.deepcopy(data)
    for dotted in UNHASHED:
        pop_dotted(hashed, dotted)
    for dotted in BLANKED:
        if get_dotted(hashed, dotted) is not None:
            set_dotted(hashed, dotted, None)
    for dotted, default in LATER_SETTINGS.items():
        if get_dotted(hashed, dotted, default) == default:
            pop_dotted(hashed, dotted)
    for dotted, value in RETIRED_SETTINGS.items():
        set_dotted(hashed, dotted, value)
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
    return expand_sweep(read_yaml_mapping(path, "sweep"), path, executor, output_root, overrides)


def absolute_spec(spec: dict[str, Any], where: Path) -> dict[str, Any]:
    """The sweep file's mapping with its paths (base, a profile given as a file, attach sweeps)
    absolute, so that a copy written elsewhere (the advisor's files) means the same sweep."""
    out = copy.deepcopy(spec)
    if isinstance(out.get("base"), str):
        out["base"] = str((where / out["base"]).resolve())
    profile = out.get("profile")
    if isinstance(profile, str) and (where / profile).is_file():
        out["profile"] = str((where / profile).resolve())
    bench = (out.get("resources") or {}).get("bench_results")
    if isinstance(bench, list):
        out["resources"]["bench_results"] = [str((where / str(b)).resolve()) for b in bench]
    for entry in (out.get("attach") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("sweep"), str):
            entry["sweep"] = str((where / entry["sweep"]).resolve())
    return out


def expand_sweep(
    spec: dict[str, Any],
    path: Path,
    executor: str | None = None,
    output_root: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Sweep:
    """The runs of a sweep file's mapping ``spec``, read from ``path`` (relative paths start there)."""
    unknown = sorted(set(spec) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(SWEEP_KEYS))})")
    name = str(spec.get("name", path.stem))
    base = _base_config(spec, path.parent)
    common = _flatten(spec.get("set") or {})
    common.update(parse_override(item, "--set") for item in overrides or [])
    recipe = copy.deepcopy(base)
    for key, value in common.items():
        if not key.startswith(RESOURCE_PREFIX):
            set_dotted(recipe, key, value)
    axes = spec.get("axes") or []
    if not isinstance(axes, list):
        raise ConfigError(f"{path}: axes: expected a list of blocks ({', '.join(BLOCK_KINDS)})")
    combos = _product(axes, "axes")
    profile_name = str(spec.get("profile", "local"))
    sweep_resources = dict(spec.get("resources") or {})
    if executor is not None:
        sweep_resources["executor"] = executor
    root = Path(output_root or spec.get("output_root") or f"runs/{name}").absolute()
    targets = parse_targets(spec.get("target"), path)

    runs: list[PlannedRun] = []
    seen: dict[str, dict[str, Any]] = {}
    missing_paths: set[str] = set()
    for values in combos:
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
            config = config_from_dict(data)  # costs do not depend on where the data is (checked below)
            check_world(config, profile.world_size)
            check_flops_budget(config)
            data = config.to_dict()  # the id: a run these later checks refuse keeps the one it had
            check_run_schedule(config)
            check_loggers(config.logging)
        except ConfigError as exc:
            error = str(exc)
        if config is not None:
            try:
                check_input_paths(config)
            except ConfigError as exc:
                missing_paths.add(str(exc))
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
    warnings = tuple(f"{m} (costs are planned anyway; launch needs it)" for m in sorted(missing_paths))
    warnings += unpacked_folder_warning(runs)
    attach = check_attach(spec.get("attach"), path)
    full = absolute_spec(spec, path.parent) | {"name": name}
    if overrides:
        full["set"] = {**(full.get("set") or {}), **dict(parse_override(o, "--set") for o in overrides)}
    if executor is not None:
        full["resources"] = {**(full.get("resources") or {}), "executor": executor}
    return Sweep(
        name, path, root, profile_name, _with_branches(runs), warnings, attach, targets, full, recipe
    )


def unpacked_folder_warning(runs: list[PlannedRun]) -> tuple[str, ...]:
    """One line when many runs would each open every file of an image folder every epoch: what a
    shared file system's administrators ask users not to do, and what prepare-data's shards avoid."""
    roots = [r.config.data.root for r in runs if r.config is not None and r.config.data.kind == "imagefolder"]
    if len(roots) < UNPACKED_RUNS:
        return ()
    root = max(set(roots), key=roots.count)
    return (
        f"{len(roots)} runs read the image folder {root} file by file (data.kind=imagefolder): on a shared "
        f"file system pack it once (nepa-scale prepare-data {root} DST) and train from "
        "the shards (data.kind=shards data.root=DST; docs/recipe.md)",
    )


def check_attach(spec: Any, where: Path) -> dict[str, dict]:
    """The ``attach`` mapping of a sweep file, checked: each entry names its sweep file (which need
    not exist until ``sweep attach`` reads it)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: attach: expected a mapping of names to {{sweep: FILE, budgets: [...]}}")
    for name, entry in spec.items():
        if not isinstance(entry, dict) or "sweep" not in entry:
            raise ConfigError(f"{where}: attach.{name}: expected {{sweep: FILE, budgets: [...]}}")
        unknown = sorted(set(entry) - ATTACH_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: attach.{name}.{unknown[0]}: unknown key (known: {', '.join(sorted(ATTACH_KEYS))})"
            )
        per_model = entry.get("per_model")
        if per_model is not None and not (
            isinstance(per_model, dict) and all(isinstance(v, dict) for v in per_model.values())
        ):
            raise ConfigError(
                f"{where}: attach.{name}.per_model: expected a mapping of model names to settings "
                "(e.g. nepa_l14: {finetune.layer_decay: 0.75})"
            )
    return spec


def _with_branches(runs: list[PlannedRun]) -> list[PlannedRun]:
    """Turn WSD runs that differ only in length into trunks and cooldown branches (design.py)."""
    valid = {run.run_id: run.config for run in runs if run.config is not None and not run.error}
    groups, errors = plan_branches(valid)
    by_id = {run.run_id: run for run in runs}
    for run_id, error in errors.items():
        by_id[run_id] = dataclasses.replace(by_id[run_id], error=error)
    for group in groups:
        trunk = by_id[group.trunk]
        trunk.config.checkpoint.keep_steps = sorted(set(group.branches.values()))
        by_id[group.trunk] = dataclasses.replace(
            trunk, config_data=trunk.config.to_dict(), trunk_of=tuple(group.branches)
        )
        for run_id, step in group.branches.items():
            run = by_id[run_id]
            run.config.branch.parent, run.config.branch.step = str(trunk.run_dir), step
            by_id[run_id] = dataclasses.replace(
                run, config_data=run.config.to_dict(), parent=group.trunk, branch_step=step
            )
    return [by_id[run.run_id] for run in runs]
