"""Consolidate a run's newest committed checkpoint into fp32 safetensors (ours and the official layout)."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nepa_scale.engine import checkpoint_store as store
from nepa_scale.engine import safe_load
from nepa_scale.errors import CheckpointError, UsageError
from nepa_scale.models.official import official_config, save_official
from nepa_scale.rundir import RunDir, follow_umask

log = logging.getLogger(__name__)


def fp32_state_dict(checkpoint: store.Committed) -> dict[str, torch.Tensor]:
    """Full fp32 weights from any ZeRO stage.

    Stage 0 keeps them whole in the model-states file. For stages 1-3 DeepSpeed's zero_to_fp32 rebuilds
    the optimised parameters from the fp32 partitions; with stages 1-2, parameters that were never
    optimised (a frozen patch embedding) are taken from the model-states file, where they are stored
    whole (zero_to_fp32 restores ZeRO-3's frozen parameters itself)."""
    stage = checkpoint.meta.get("zero_stage", 0)
    module: dict[str, torch.Tensor] = {}
    if stage < 3:
        states_file = checkpoint.path / "mp_rank_00_model_states.pt"
        try:
            states = safe_load.load(states_file, safe_load.deepspeed_classes())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read {states_file}: {type(exc).__name__}: {exc}") from None
        module = {k: v.float() for k, v in states["module"].items()}
    if stage == 0:
        return module
    # heavy: DeepSpeed, only for an export (the tasks read this module for stale_export)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with safe_load.weights_only_loads(checkpoint.path):  # zero_to_fp32 reads with pickle's full power
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot consolidate the ZeRO-{stage} shards of {checkpoint.path}: {type(exc).__name__}: {exc}"
        ) from None
    out = {k: v.float() for k, v in state.items()}
    for key, value in module.items():
        out.setdefault(key, value)
    return out


def newest_verified(run: RunDir) -> store.Committed:
    """The run's newest committed checkpoint, verified against its manifest."""
    committed = store.committed_checkpoints(run.checkpoints)
    if not committed:
        raise CheckpointError(f"no committed checkpoint under {run.checkpoints}")
    store.verify(committed[-1])
    return committed[-1]


EXPORTED = "model.safetensors"


def exported_step(path: str | Path) -> int | None:
    """The step an export holds (its metadata), None for a file without it, not there or not a
    safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {}).get("step"))
    except (OSError, TypeError, ValueError, RuntimeError, SafetensorError):  # not a safetensors file
        return None


def stale_export(run_dir: str | Path) -> tuple[int | None, int] | None:
    """(the step RUN/export/ holds, the run's newest committed step) when the export is missing or
    older than the newest checkpoint; None when it is current."""
    run = RunDir(run_dir)
    committed = store.committed_checkpoints(run.checkpoints)
    if not committed:
        return None
    held = exported_step(run.export / EXPORTED)
    return None if held == committed[-1].step else (held, committed[-1].step)


def _writable(folder: Path) -> None:
    """``folder`` exists (made if need be) and takes a file, or a one-line error naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"export: cannot write to {folder}: {exc.strerror or exc}") from None


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Consolidate the run's newest committed checkpoint; returns the files written (the step they
    hold is in their metadata: ``exported_step``)."""
    run = RunDir(run_dir)
    latest = newest_verified(run)
    config = run.config()
    arch = config.model.arch()
    out = Path(out_dir) if out_dir else run.export
    _writable(out)
    written = _write_export(latest, config, arch, out)
    follow_umask(*written.values())
    log.info("exported step %d of %s to %s", latest.step, run.root, out)
    return written


def _write_export(latest: store.Committed, config, arch, out: Path) -> dict[str, Path]:
    state = {k: v.contiguous() for k, v in fp32_state_dict(latest).items()}
    meta = {"step": str(latest.step), "model": config.model.name, "layout": "nepa_scale"}
    written = {"ours": out / EXPORTED, "official": out / "official" / "model.safetensors"}
    save_file(state, str(written["ours"]), metadata=meta)
    if config.task == "segment":  # backbone + pyramid + heads: the official layout has no place for them
        del written["official"]
        return written
    written["official"].parent.mkdir(exist_ok=True)
    save_official(state, written["official"])
    (written["official"].parent / "config.json").write_text(json.dumps(official_config(arch), indent=2))
    ema_file = latest.path / store.EMA_FILE
    if ema_file.is_file():
        ema = {k: v.float().contiguous() for k, v in safe_load.load(ema_file).items()}
        written["ema"] = out / "model_ema.safetensors"
        save_file(ema, str(written["ema"]), metadata={**meta, "ema_decay": str(config.checkpoint.ema_decay)})
        written["ema_official"] = out / "official" / "model_ema.safetensors"
        save_official(ema, written["ema_official"])
    written["config"] = written["official"].parent / "config.json"
    return written
