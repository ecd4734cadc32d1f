"""Torch files from a run directory, read so that they cannot run code.

A torch file is a pickle, and unpickling calls whatever the file names: a colleague's checkpoint,
a downloaded run or a shared study could run code on the machine that reads it. So every torch
file the project or DeepSpeed reads from a run directory is read with ``weights_only=True``
(tensors, plain containers and numbers) plus an allow-list of the few classes those files hold
(``DEEPSPEED_CLASSES``; the RNG files written before they became JSON: ``legacy_rng_classes``):

- ``check``: before anything is loaded, ``checkpoint_store.verify`` lists what each torch file of a
  checkpoint would call or build (read from the pickle, not unpickled) and refuses a file naming
  anything else, naming the file, before an engine is built;
- ``load``: the project's own torch files (the EMA weights, RNG files of older checkpoints);
- ``safe_checkpoint_engine``: DeepSpeed's checkpoint engine with ``load`` replaced by the same
  reading (``install`` puts it into an engine);
- ``weights_only_loads``: around the DeepSpeed calls that read files without their checkpoint
  engine (the universal checkpoint's loader, ``ds_to_universal``, ``zero_to_fp32``, all of which
  ask for ``weights_only=False``), torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes every load
  weights-only, with the allow-list.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.serialization import get_safe_globals, get_unsafe_globals_in_checkpoint, safe_globals

from nepa_scale.errors import CheckpointError, UnsafePickle

# Beyond tensors and plain values, DeepSpeed 0.19's checkpoint files hold these (found by loading
# checkpoints of ZeRO 0-3 in fp32 and bf16, and their universal conversions, weights-only): numbers
# in a class, none with code of its own to run.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the optimizer's (static) loss scale
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same for fp16 (deepspeed.extra)
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # the ZeRO stage, an int enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # (numel, start) of a ZeRO parameter fragment
)

FORCE, FORCE_NOT = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def legacy_rng_classes() -> list[tuple[Any, str]]:
    """What the RNG files of older checkpoints (``torch.save`` of numpy's legacy state) hold: a
    uint32 array, rebuilt by numpy's ``_reconstruct`` (named ``numpy.core`` by numpy 1)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (type(np.dtype(np.uint32)), f"numpy.dtypes.{type(np.dtype(np.uint32)).__name__}"),
    ]


def deepspeed_classes() -> list[tuple[Any, str]]:
    """``DEEPSPEED_CLASSES`` as (class, name), for torch's allow-list (imports DeepSpeed)."""
    out = []
    for name in DEEPSPEED_CLASSES:
        module, _, attribute = name.rpartition(".")
        out.append((getattr(importlib.import_module(module), attribute), name))
    return out


def allowed_names(classes: list[tuple[Any, str]]) -> set[str]:
    return {name for _, name in classes}


def check(file: Path, allowed: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse ``file`` (naming it) when its pickle names a global outside torch's weights-only set
    and ``allowed``; nothing is unpickled. A file that is not a zip-format torch file is left to
    the weights-only load, which refuses the same globals (only without this listing)."""
    if not zipfile.is_zipfile(file):
        return
    try:
        unsafe = [name for name in get_unsafe_globals_in_checkpoint(file) if name not in allowed]
    except (OSError, ValueError, RuntimeError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read {file} as a torch file: {type(exc).__name__}: {exc}") from None
    if unsafe:
        raise UnsafePickle.naming(file, sorted(set(unsafe)))


def _allowing(classes: list[tuple[Any, str]]) -> safe_globals:
    """torch's allow-list context for those of ``classes`` not allowed already: leaving one removes
    its entries, even those allowed before it (by an enclosing one, or for good)."""
    return safe_globals([entry for entry in classes if entry not in get_safe_globals()])


def load(file: Path | str, classes: list[tuple[Any, str]] = (), map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file from a run directory: weights only, with ``classes`` allowed."""
    try:
        with _allowing(classes):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickle.naming(file, exc) from None


@contextmanager
def weights_only_loads(where: Path | str) -> Iterator[None]:
    """Every ``torch.load`` inside reads weights only, with DeepSpeed's classes allowed, whatever
    its caller asked: for DeepSpeed's loaders that bypass their checkpoint engine. A refusal
    names ``where`` (the checkpoint; ``check`` has named the file before, so this is the second
    line of defence)."""
    saved = {name: os.environ.pop(name, None) for name in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    try:
        with _allowing(deepspeed_classes()):
            yield
    except pickle.UnpicklingError as exc:
        raise UnsafePickle.naming(f"a file under {where}", exc) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def install(engine: Any) -> None:
    """Give a DeepSpeed engine ``safe_checkpoint_engine`` in place of its default torch one (another
    kind, configured through ``deepspeed.extra``, keeps its own; ``weights_only_loads`` covers it)."""
    # heavy: DeepSpeed; the launcher and the analysis import this module (through checkpoint_store)
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = safe_checkpoint_engine()(engine._config)


@functools.cache
def safe_checkpoint_engine() -> type:
    """DeepSpeed's torch checkpoint engine, saving as it does, whose ``load`` is ``load`` above
    with DeepSpeed's classes allowed: a refusal names the file."""
    # heavy: DeepSpeed (see install)
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load(path, deepspeed_classes(), map_location=map_location)

    return SafeCheckpointEngine
