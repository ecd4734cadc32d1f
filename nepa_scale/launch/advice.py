"""``sweep advise``: the runs a study should pay for next, as a sweep file ``sweep launch`` accepts.

The criterion is analysis (scaling/advise.py); this module gives it its tables from the study:

- the **targets** of the sweep file (targets.py), resolved with the study's recipe into N, D and
  the planner's GPU-hours;
- the **points**: every completed run's final value of the fitted quantity (scaling/report.py);
- the **pool**: the study's own models and the zoo's models of the same image and patch size, at
  the study's budgets and twice, four and eight times its longest (below the target's), for the
  seeds it has and one more; each candidate planned by ``plan_run`` on the study's profile. A
  candidate at the length of a trunk already trained is a cooldown branch of that trunk where the
  trunk committed a checkpoint at its branch point (``checkpoint.keep_every`` keeps them), and
  costs only its cooldown; candidates of one new model and seed share one new trunk, as the
  planner would train them.

The advice file lists the chosen runs with the axis values the study's own runs use, so a config
the study already has gets its id, and the trunks they branch from, so the planner branches them.
Its runs land in the study's ``output_root``; files of earlier advice (``advice/*.yaml`` there)
count as part of the study.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from nepa_scale.config.files import get_dotted
from nepa_scale.engine.schedule import cooldown_start
from nepa_scale.errors import ConfigError, DataError
from nepa_scale.launch.design import training_steps
from nepa_scale.launch.plan import plan_run
from nepa_scale.launch.sweep import PlannedRun, Sweep, expand_sweep, load_sweep
from nepa_scale.launch.targets import TargetSpec
from nepa_scale.models.zoo import count_params, get_arch, list_models
from nepa_scale.rundir import RunDir, images_seen
from nepa_scale.scaling.target import Target, write_study_record

ADVICE_DIR = "advice"  # in the study's output_root: the sweep files the advisor wrote
BUDGET_KEYS = ("budget.images", "budget.epochs", "budget.flops")
LONGER = (2, 4, 8)  # new budgets: these multiples of the study's longest
MODEL_KEYS = ("model.name", "model.overrides")  # axis keys that make a run's model


# ----------------------------------------------------------------------------- the study's runs


def advice_files(sweep: Sweep) -> list[Path]:
    """The study's advice files, oldest first, less a last one never launched (some run of it has no
    run directory yet): that one is a proposal, and the next advice replaces it."""
    files = sorted((sweep.output_root / ADVICE_DIR).glob("advice-*.yaml"))
    if files and not all((run.run_dir / "run.json").is_file() for run in load_sweep(files[-1]).runs):
        files.pop()
    return files


def study_runs(sweep: Sweep) -> list[PlannedRun]:
    """The sweep's runs and those of every advice file written for it (one each, by run id)."""
    runs = {run.run_id: run for run in sweep.runs}
    for path in advice_files(sweep):
        for run in load_sweep(path).runs:
            runs.setdefault(run.run_id, run)
    return list(runs.values())


def _with_values(sweep: Sweep, values: list[dict[str, Any]], tag: str) -> list[PlannedRun]:
    """The runs these axis values make with the sweep's base, set, profile and output_root, each
    values mapping one zip block in one union (so a run's id is what the same values give anywhere)."""
    if not values:
        return []
    spec = copy.deepcopy(sweep.spec)
    spec["axes"] = [{"union": [[{"zip": {k: [v] for k, v in vals.items()}}] for vals in values]}]
    spec["output_root"] = str(sweep.output_root)
    return expand_sweep(spec, sweep.path.with_name(f"{sweep.path.stem}.{tag}.yaml")).runs


# ----------------------------------------------------------------------------- targets


def resolve_target(sweep: Sweep, spec: TargetSpec) -> Target:
    """The target as a run of the study's recipe: its N, its D in images, and the GPU-hours the
    planner gives it on the profile of the study's runs of the same model (else of its largest)."""
    overrides = {**(get_dotted(sweep.recipe, "model.overrides") or {}), **spec.overrides}
    arch = get_arch(spec.model, **overrides)
    counts = count_params(arch)
    values: dict[str, Any] = {"model.name": spec.model, "model.overrides": overrides}
    values |= {key: None for key in BUDGET_KEYS}
    values[f"budget.{spec.kind}"] = int(spec.value) if spec.kind == "images" else spec.value
    same = [r for r in sweep.runs if r.config is not None and r.config.model.name == spec.model]
    runs = same or sorted(
        (r for r in sweep.runs if r.config), key=lambda r: count_params(r.config.model.arch())["total"]
    )
    for key, value in runs[-1].values.items() if runs else ():
        if key.startswith("resources."):
            values[key] = value
    (run,) = _with_values(sweep, [values], "target")
    if run.config is None:
        raise ConfigError(f"target {spec.name}: {run.error}")
    note, hours = "", None
    try:
        images = images_seen(training_steps(run.config), run.config.budget.global_batch)
        plan = plan_run(run)
        hours = plan.device_hours if plan.error is None else None
        note = plan.error or ""
    except (DataError, OSError) as exc:  # an epochs budget needs the training set's size
        raise ConfigError(
            f"target {spec.name}: {exc} (give the target's budget in images instead of epochs)"
        ) from None
    return Target(
        spec.name,
        float(counts["total"]),
        float(images),
        float(counts["without_patch_embed"]),
        arch.num_tokens,
        hours,
        note,
    )


def resolve_targets(sweep: Sweep, specs: list[TargetSpec] | None = None, record: bool = True) -> list[Target]:
    """``specs`` (default: the sweep file's) resolved; recorded in the study's study.json for the
    report when ``record``."""
    targets = [resolve_target(sweep, spec) for spec in (specs if specs is not None else sweep.targets)]
    if record and targets:
        write_study_record(sweep.output_root, str(sweep.path), targets)
    return targets


# ----------------------------------------------------------------------------- the pool


@dataclass(frozen=True)
class ModelTemplate:
    key: str  # what makes the model: its axis values
    params: int
    values: dict[str, Any]  # axis values of one of its runs (the template of its candidates)


def _model_key(run: PlannedRun) -> str:
    model = run.config_data.get("model", {})
    return json.dumps({"name": model.get("name"), "overrides": model.get("overrides") or {}}, sort_keys=True)


def _budget_key(runs: list[PlannedRun]) -> str:
    """The budget key the study varies (budget.images unless it varies epochs or FLOPs)."""
    for key in BUDGET_KEYS:
        if any(key in run.values for run in runs):
            return key
    return "budget.images"


def model_templates(runs: list[PlannedRun], sweep: Sweep) -> dict[str, ModelTemplate]:
    """The study's models, and the zoo's models of the same image and patch size where the study
    names its models by ``model.name`` alone (no size overrides)."""
    models: dict[str, ModelTemplate] = {}
    for run in sorted((r for r in runs if r.config is not None), key=lambda r: r.run_id):
        key = _model_key(run)
        if key not in models:
            models[key] = ModelTemplate(key, count_params(run.config.model.arch())["total"], dict(run.values))
    by_name = [
        r
        for r in runs
        if r.config is not None and "model.name" in r.values and "model.overrides" not in r.values
    ]
    if by_name and not get_dotted(sweep.recipe, "model.overrides"):
        template, arch = by_name[0], by_name[0].config.model.arch()
        for name in list_models():
            zoo = get_arch(name)
            key = json.dumps({"name": name, "overrides": {}}, sort_keys=True)
            if key not in models and (zoo.image_size, zoo.patch_size) == (arch.image_size, arch.patch_size):
                values = {k: v for k, v in template.values.items() if not k.startswith("resources.")}
                models[key] = ModelTemplate(key, count_params(zoo)["total"], values | {"model.name": name})
    return models


def _budget_grid(runs: list[PlannedRun], key: str, target_images: float) -> list[float]:
    """The study's budgets, the geometric midpoints between them (under WSD, a cooldown branch of a
    trunk already trained: cheap points along D) and LONGER multiples of its longest (below the
    target's, for an images budget)."""
    values = sorted(
        {float(v) for r in runs if (v := r.values.get(key, get_dotted(r.config_data, key))) is not None}
    )
    if not values:
        return []
    middle = [math.sqrt(a * b) for a, b in zip(values, values[1:], strict=False)]
    longer = [values[-1] * m for m in LONGER]
    if key == "budget.images":
        longer = [d for d in longer if d < target_images]
        batch = max(r.config.budget.global_batch for r in runs if r.config is not None)
        middle = [batch * max(1, round(d / batch)) for d in middle]  # whole steps
    grid = sorted({*values, *middle, *longer})
    return [int(v) if float(v).is_integer() else v for v in grid]


def _existing(runs: list[PlannedRun]) -> dict[str, dict]:
    """run id -> its state on disk: completed, and the steps of its committed checkpoints."""
    out = {}
    for run in runs:
        rd = RunDir(run.run_dir)
        if not rd.run_json.is_file():
            continue
        try:
            status = rd.record().status
        except Exception:  # unreadable run.json: the status poll reports it; not a trunk to branch from
            status = None
        steps = (
            [
                int(p.name.split("-")[-1])
                for p in rd.checkpoints.glob("step-*")
                if rd.has_committed(int(p.name.split("-")[-1]))
            ]
            if rd.checkpoints.is_dir()
            else []
        )
        out[run.run_id] = {"status": status, "committed": set(steps)}
    return out


def candidate_values(sweep: Sweep, runs: list[PlannedRun], targets: list[Target]) -> list[dict[str, Any]]:
    """Axis values of every candidate: each model (not larger than the targets) x each budget of
    the grid x each seed of the study and one more."""
    key = _budget_key(runs)
    biggest = max(t.params for t in targets)
    longest = max(t.images for t in targets)
    seeds = sorted({r.config.seed for r in runs if r.config is not None})
    seeds = seeds + [max(seeds, default=-1) + 1]
    base_seed = get_dotted(sweep.recipe, "seed", 0)
    grid = _budget_grid(runs, key, longest)
    out, seen = [], set()
    for model in model_templates(runs, sweep).values():
        if model.params > biggest:
            continue
        for budget in grid:
            for seed in seeds:
                values = dict(model.values)
                for other in BUDGET_KEYS:
                    if other != key and other in values:
                        values[other] = None
                values[key] = budget
                if "seed" in values or seed != base_seed:  # as the study's own runs name their seed
                    values["seed"] = seed
                frozen = json.dumps(values, sort_keys=True, default=str)
                if frozen not in seen:
                    seen.add(frozen)
                    out.append(values)
    return out


def candidate_pool(
    sweep: Sweep,
    targets: list[Target],
    n_kind: str = "params",
    d_kind: str = "images",
    planned_are_candidates: bool = False,
) -> pd.DataFrame:
    """Every candidate run with its N, D (as the study counts them), cost, branch cost and group
    (scaling/advise.py: what the criterion reads), its kind and its axis values. The study's runs
    are not candidates, except, with ``planned_are_candidates``, those with no run directory yet
    (benchmarks/advise_simulated.py: a study planned but not run)."""
    runs = study_runs(sweep)
    disk = _existing(runs)
    known = {r.run_id for r in runs if r.run_id in disk or not planned_are_candidates}
    trunks: dict[str, PlannedRun] = {}  # (model, seed) -> its longest completed WSD run
    for run in runs:
        if (
            run.config is not None
            and disk.get(run.run_id, {}).get("status") == "completed"
            and run.config.optim.schedule == "wsd"
        ):
            group = f"{_model_key(run)}|{run.config.seed}"
            if group not in trunks or training_steps(run.config) > training_steps(trunks[group].config):
                trunks[group] = run
    rows = []
    for run in _with_values(sweep, candidate_values(sweep, runs, targets), "pool"):
        if run.run_id in known or run.config is None or run.error:
            continue
        arch, config = run.config.model.arch(), run.config
        counts = count_params(arch)
        n = counts["without_patch_embed"] if n_kind == "params_no_embed" else counts["total"]
        steps = training_steps(config)
        images = images_seen(steps, config.budget.global_batch)
        d = images * (arch.num_tokens - 1) if d_kind == "patches" else images
        if any(n >= t.n and d >= t.d for t in targets) or all(d > t.d for t in targets):
            continue  # the target region itself, or beyond it
        plan = plan_run(run)
        if plan.error:
            continue
        cooldown = (steps - cooldown_start(config.optim, steps)) / steps
        group = f"{_model_key(run)}|{config.seed}"
        trunk = trunks.get(group)
        kind, trunk_id, cost = "new run", None, plan.device_hours
        if trunk is not None and config.optim.schedule == "wsd":
            start = cooldown_start(config.optim, steps)
            if start in disk[trunk.run_id]["committed"] and steps < training_steps(trunk.config):
                kind, trunk_id, cost, group = (
                    f"branch of {trunk.run_id}",
                    trunk.run_id,
                    plan.device_hours * cooldown,
                    "",
                )
            else:
                group = f"{group}|new"  # a new trunk of this seed: the old one cannot branch here
        elif not any(r.config is not None and f"{_model_key(r)}|{r.config.seed}" == group for r in runs):
            kind = (
                "new seed" if any(_model_key(r) == _model_key(run) for r in runs if r.config) else "new model"
            )
        rows.append(
            {
                "candidate": run.run_id,
                "model": config.model.name,
                "N": float(n),
                "D": float(d),
                "seed": config.seed,
                "steps": steps,
                "cost": cost,
                "branch_cost": plan.device_hours * cooldown
                if config.optim.schedule == "wsd"
                else plan.device_hours,
                "group": group if config.optim.schedule == "wsd" else "",
                "kind": kind,
                "trunk": trunk_id,
                "values": run.values,
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the advice file


def advice_spec(sweep: Sweep, chosen: pd.DataFrame, note: str) -> dict[str, Any]:
    """A sweep file of the chosen runs (and the trunks they branch from), landing in the study."""
    by_id = {run.run_id: run for run in study_runs(sweep)}
    values = [dict(v) for v in chosen["values"]]
    for trunk in sorted({t for t in chosen.get("trunk", pd.Series(dtype=object)).dropna()}):
        values.append(dict(by_id[trunk].values))
    spec = copy.deepcopy(sweep.spec)
    spec["description"] = note
    spec["axes"] = [{"union": [[{"zip": {k: [v] for k, v in vals.items()}}] for vals in values]}]
    spec["output_root"] = str(sweep.output_root)
    spec.pop("attach", None)
    return spec


def write_advice(path: Path, spec: dict[str, Any]) -> Path:
    """Write the advice file atomically (the closed loop reads a half-written one as not there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by nepa-scale sweep advise: launch with `nepa-scale sweep launch THIS_FILE`.\n"
    text += yaml.safe_dump(spec, sort_keys=False, default_flow_style=None, width=110)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


__all__ = [
    "ADVICE_DIR",
    "advice_files",
    "advice_spec",
    "candidate_pool",
    "resolve_targets",
    "study_runs",
    "write_advice",
]
