"""Checkpoint directories on disk: the ``COMMITTED`` marker with its manifest, verification against
it, the half-written leftovers of a kill, retention, and one RNG file per rank.

A checkpoint is ``checkpoints/step_XXXXXXXX/``: DeepSpeed's own files (every rank writes its shards),
one ``rng_rankNNNNN.pt`` per rank, and ``COMMITTED``, written last by rank 0 after a barrier, holding
a manifest (every file with its size). Only committed checkpoints count. The checkpointer
(``checkpoint.py``) decides what to do with them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nepa_scale.errors import CheckpointError
from nepa_scale.rundir import MARKER, PREFIX, write_json_atomic

log = logging.getLogger("nepa_scale.engine.checkpoint")

UNIVERSAL_SUFFIX = "_universal"  # DeepSpeed's universal copy of a checkpoint, for a new world size
EMA_FILE = "ema.pt"  # the EMA weights, beside DeepSpeed's files


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(PREFIX) or name.endswith(UNIVERSAL_SUFFIX):
        return None
    digits = name[len(PREFIX) :]
    return int(digits) if digits.isdigit() else None


@dataclass(frozen=True)
class Committed:
    path: Path
    step: int
    meta: dict[str, Any]

    @property
    def tag(self) -> str:
        return self.path.name


def read_marker(path: Path) -> dict[str, Any] | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"commit marker {marker} cannot be read: {exc}") from None


def committed_checkpoints(root: Path) -> list[Committed]:
    """Committed checkpoints, oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            step = step_of(path)
            if step is None or not path.is_dir():
                continue
            meta = read_marker(path)
            if meta is not None:
                found.append(Committed(path, step, meta))
    return sorted(found, key=lambda c: c.step)


def remove_uncommitted(root: Path) -> list[Path]:
    """Delete half-written checkpoint directories (no marker). Call on one rank before anyone saves."""
    removed = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if step_of(path) is not None and path.is_dir() and not (path / MARKER).exists():
                log.warning("removing half-written checkpoint %s (no %s marker)", path, MARKER)
                shutil.rmtree(path)
                removed.append(path)
    return removed


def manifest(path: Path) -> dict[str, int]:
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MARKER
    }


def commit(path: Path, meta: dict[str, Any]) -> None:
    """Write the marker (atomically, last): from now on the checkpoint counts."""
    write_json_atomic(path / MARKER, {**meta, "files": manifest(path)})


def verify(checkpoint: Committed) -> None:
    """Every file of the manifest exists with its recorded size."""
    for rel, size in checkpoint.meta.get("files", {}).items():
        file = checkpoint.path / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file truncated or changed: {file} ({actual} bytes, committed {size})"
            )


def retention(root: Path, keep_last: int, keep_every: int, keep_steps: list[int] | None = None) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last`` unless their step is a multiple of
    ``keep_every`` or one of ``keep_steps`` (a WSD trunk's branch points)."""
    committed = committed_checkpoints(root)
    recent = {c.step for c in committed[-keep_last:]} | set(keep_steps or [])
    removed = []
    for c in committed:
        if c.step in recent or (keep_every and c.step % keep_every == 0):
            continue
        shutil.rmtree(c.path)
        universal = c.path.with_name(c.path.name + UNIVERSAL_SUFFIX)
        if universal.is_dir():
            shutil.rmtree(universal)
        removed.append(c.path)
    return removed


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank:05d}.pt"


def save_rng(path: Path, rank: int, extra: dict[str, Any] | None = None) -> None:
    """This rank's RNG streams, plus any other rank-local state (``extra``), in one file."""
    torch.save({**rng_state(), **(extra or {})}, rng_file(path, rank))


def load_rng(path: Path, rank: int) -> dict[str, Any]:
    file = rng_file(path, rank)
    try:
        # RNG states hold numpy arrays and python tuples, which weights_only refuses.
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc}") from None
