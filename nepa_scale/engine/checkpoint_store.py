"""Checkpoint directories on disk: the ``COMMITTED`` marker with its manifest, verification against
it, the half-written leftovers of a kill, retention, and one RNG file per rank.

A checkpoint is ``checkpoints/step_XXXXXXXX/``: DeepSpeed's own files (every rank writes its shards),
one ``rng_rankNNNNN.json`` per rank (``.pt``, a pickle, in checkpoints written before), the EMA
weights, and ``COMMITTED``, written last by rank 0 after a barrier, holding a manifest (every file
with its size). Only committed checkpoints count, and only once they verify: every file of the
manifest there with its size, and no torch file naming code to run (``safe_load``). The
checkpointer (``checkpoint.py``) decides what to do with them.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nepa_scale.engine import safe_load
from nepa_scale.errors import CheckpointError
from nepa_scale.rundir import MARKER, PREFIX, write_json_atomic

log = logging.getLogger("nepa_scale.engine.checkpoint")

UNIVERSAL_SUFFIX = "_universal"  # DeepSpeed's universal copy of a checkpoint, for a new world size
EMA_FILE = "ema.pt"  # the EMA weights, beside DeepSpeed's files
RNG_PREFIX = "rng_rank"  # + the rank: one file of RNG streams per rank


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
    """Every file of the manifest exists with its recorded size, and no torch file in the checkpoint
    (listed or not: DeepSpeed finds some by name) names anything but what checkpoints hold."""
    for rel, size in checkpoint.meta.get("files", {}).items():
        file = checkpoint.path / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file truncated or changed: {file} ({actual} bytes, committed {size})"
            )
    legacy_rng = safe_load.allowed_names(safe_load.legacy_rng_classes())
    for file in sorted(checkpoint.path.rglob("*.pt")):
        rng = file.name.startswith(RNG_PREFIX)
        safe_load.check(file, legacy_rng if rng else set(safe_load.DEEPSPEED_CLASSES))


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


def rng_file(path: Path, rank: int, legacy: bool = False) -> Path:
    """This rank's RNG file: JSON; ``legacy``: the torch pickle of checkpoints written before."""
    return path / f"{RNG_PREFIX}{rank:05d}.{'pt' if legacy else 'json'}"


def _bytes(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """``rng_state()`` as JSON (integers, and torch's byte states in base64): exact, and nothing
    in it is code."""
    version, internal, gauss_next = state["python"]
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    out = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _bytes(state["torch"]),
    }
    if "cuda" in state:
        out["cuda"] = _bytes(state["cuda"])
    return out


def rng_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``rng_to_json``: what ``set_rng_state`` takes."""
    py, nb = data["python"], data["numpy"]
    state = {
        "python": (py["version"], tuple(py["internal"]), py["gauss_next"]),
        "numpy": (
            nb["bit_generator"],
            np.array(nb["keys"], dtype=np.uint32),
            nb["pos"],
            nb["has_gauss"],
            nb["cached_gaussian"],
        ),
        "torch": _tensor(data["torch"]),
    }
    if "cuda" in data:
        state["cuda"] = _tensor(data["cuda"])
    return state


def save_rng(path: Path, rank: int, extra: dict[str, Any] | None = None) -> None:
    """This rank's RNG streams, plus any other rank-local state (``extra``: plain values), in one
    JSON file."""
    write_json_atomic(rng_file(path, rank), {"rng": rng_to_json(rng_state()), "rank_state": extra or {}})


def load_rng(path: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG streams and other saved state (``save_rng``), from its JSON file or, in a
    checkpoint written before, its torch file (read weights-only: numpy's state array allowed);
    None when the checkpoint has neither (a different world size)."""
    file = rng_file(path, rank)
    if file.is_file():
        try:
            data = json.loads(file.read_text())
            return {**rng_from_json(data["rng"]), **data["rank_state"]}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {file}: {type(exc).__name__}: {exc}") from None
    legacy = rng_file(path, rank, legacy=True)
    if not legacy.is_file():
        return None
    try:
        return safe_load.load(legacy, safe_load.legacy_rng_classes())
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {legacy}: {type(exc).__name__}: {exc}") from None
