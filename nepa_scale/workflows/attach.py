"""Downstream studies attached to a pretraining sweep: a segmentation (or classification) fine-tune
of each pretraining run, or of the runs of chosen budgets.

    attach:                               # in the pretraining sweep file
      segment:                            # a name: the runs live in <output_root>_segment/
        sweep: demo_segment.yaml          # the downstream sweep: base config, set, profile
        budgets: [76800, 153600]          # optional: only runs of these budget.images (default: all)
        per_model:                        # optional: settings that differ by model (the paper's
          nepa_l14: {finetune.layer_decay: 0.75}   # L recipe against its B recipe, say)

``nepa-scale sweep attach SWEEP.yaml`` plans, for every completed pretraining run it selects, one
downstream run with that run's model shape and seed, initialised from its weights (exported first
where they are not), and launches them as a sweep of their own (records, resume, preemption; a
re-run skips what is done). The resolved sweep file is kept beside the runs. ``collect`` then
carries each pretraining run's mIoU (segmentation) or top-1 and error (classification:
``report --quantity ft_error`` fits the paper's metric of record).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from nepa_scale.config import config_from_dict
from nepa_scale.config.files import read_yaml_mapping, set_dotted
from nepa_scale.engine.export import export_run, stale_export
from nepa_scale.errors import ConfigError
from nepa_scale.launch.sweep import Sweep, load_sweep
from nepa_scale.rundir import RunDir

PRETRAINED_KEY = {"segment": "segment.pretrained", "finetune": "finetune.pretrained"}
# NepaArch fields that shape the weights: a downstream run takes them from its source run.
SHAPE_KEYS = {
    "image_size",
    "patch_size",
    "in_chans",
    "dim",
    "depth",
    "num_heads",
    "mlp",
    "mlp_hidden",
    "qkv_bias",
    "qk_norm",
}


def resolved_sweep_file(spec_file: str | Path, spec: dict, output_root: Path, axes: list, name: str) -> Path:
    """``spec`` with its base made absolute, ``axes`` and ``output_root`` set, written beside the runs."""
    if "base" not in spec:
        raise ConfigError(f"{spec_file}: base: the run config the downstream runs start from")
    spec = {**spec, "base": str((Path(spec_file).parent / spec["base"]).resolve())}
    spec["axes"], spec["output_root"] = axes, str(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    resolved = output_root / name
    resolved.write_text(yaml.safe_dump(spec, sort_keys=False))
    return resolved


def attached_sweep(sweep: Sweep, name: str, executor: str | None = None) -> Sweep:
    """The downstream sweep ``name`` of ``sweep``: one run per selected completed pretraining run."""
    if name not in sweep.attach:
        raise ConfigError(f"sweep {sweep.name}: no attach.{name} (have: {', '.join(sweep.attach) or 'none'})")
    entry = sweep.attach[name]
    spec_file = sweep.path.parent / entry["sweep"]
    if not spec_file.is_file():  # checked here, not when the study is planned: only attach needs it
        raise ConfigError(f"{sweep.path}: attach.{name}.sweep: file not found: {spec_file}")
    spec = read_yaml_mapping(spec_file, "attached sweep")
    budgets = entry.get("budgets")
    selected = [
        run
        for run in sweep.runs
        if run.config is not None and (budgets is None or run.config.budget.images in budgets)
    ]
    status = {run.run_id: RunDir(run.run_dir).record().status or "not launched" for run in selected}
    sources = [run for run in selected if status[run.run_id] == "completed"]
    unfinished = [  # said, never silently left out: attach again once they complete
        f"attach.{name}: {run.run_id} is {status[run.run_id]}, not complete: not attached (run `nepa-scale "
        f"sweep attach {sweep.path}` again once it completes)"
        for run in selected
        if status[run.run_id] != "completed"
    ]
    if not sources:
        raise ConfigError(
            f"sweep {sweep.name}: attach.{name}: no completed pretraining run"
            + (f" with budget.images in {budgets}" if budgets else "")
        )
    if not isinstance(spec.get("base"), str):
        raise ConfigError(f"{spec_file}: base: the run config file the downstream runs start from")
    base = read_yaml_mapping(spec_file.parent / spec["base"], "base config")
    task = (spec.get("set") or {}).get("task") or base.get("task") or "pretrain"
    if task not in PRETRAINED_KEY:
        raise ConfigError(f"{spec_file}: base: a segment or finetune config, got task '{task}'")
    defaults = downstream_defaults(base, spec)
    # The recipe's own model settings (e.g. fine-tuning's qk_norm_affine), never its shape: the shape
    # is the source's.
    recipe = {k: v for k, v in defaults["model"]["overrides"].items() if k not in SHAPE_KEYS}
    models = [run.config.model.name for run in sources]
    columns = {
        PRETRAINED_KEY[task]: [str(run.run_dir) for run in sources],
        "seed": [run.config.seed for run in sources],
        "model.name": models,
        "model.overrides": [{**recipe, **run.config.model.overrides} for run in sources],
    }
    columns |= per_model_columns(entry.get("per_model") or {}, defaults, models)
    axes = [{"zip": columns}]
    root = sweep.output_root.parent / f"{sweep.output_root.name}_{name}"
    downstream = load_sweep(
        resolved_sweep_file(spec_file, spec, root, axes, "attached_sweep.yaml"), executor=executor
    )
    return dataclasses.replace(downstream, warnings=(*downstream.warnings, *unfinished))


def downstream_defaults(base: dict, spec: dict) -> dict:
    """The downstream sweep's own settings: its base config with its ``set`` (values only)."""
    data = json.loads(json.dumps(base))
    for key, value in (spec.get("set") or {}).items():
        set_dotted(data, key, value)
    return config_from_dict(data).to_dict()


def per_model_columns(per_model: dict, defaults: dict, models: list[str]) -> dict[str, list]:
    """Zip columns for the settings ``per_model`` changes: each source's model's value, else the
    downstream sweep's own (``defaults``)."""
    keys = sorted({key for settings in per_model.values() for key in settings})

    def default(key: str):
        node = defaults
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"attach: per_model: {key}: not a setting of the downstream runs")
            node = node[part]
        return node

    return {key: [per_model.get(model, {}).get(key, default(key)) for model in models] for key in keys}


def export_sources(downstream: Sweep) -> list[Path]:
    """Export the weights of each source run the downstream runs start from, where its export/ is
    missing or older than its newest checkpoint (the fine-tunes read them from there); returns the
    runs exported."""

    exported = []
    for run in downstream.runs:
        if run.error:  # an invalid run is not launched: nothing to export for it
            continue
        source = (
            run.config.segment.pretrained if run.config.task == "segment" else run.config.finetune.pretrained
        )
        if source and Path(source).is_dir() and stale_export(source) is not None:
            export_run(source)
            exported.append(Path(source))
    return exported
