"""NEPA model zoo: architecture, attention backends, official-layout interop.

Names are imported lazily (PEP 562) so that ``nepa_scale.models.arch`` and ``.zoo`` can be used
to validate configs without paying for ``import torch``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BACKENDS": "arch",
    "NepaArch": "arch",
    "resolve_backend": "attention",
    "LayoutError": "official",
    "load_weights": "official",
    "save_official": "official",
    "NEPA": "vit",
    "NepaOutput": "vit",
    "count_params": "zoo",
    "create_model": "zoo",
    "get_arch": "zoo",
    "list_models": "zoo",
    "nepa_tiny": "zoo",
    "nepa_s14": "zoo",
    "nepa_b14": "zoo",
    "nepa_l14": "zoo",
    "nepa_h14": "zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nepa_scale.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"nepa_scale.models.{_EXPORTS[name]}"), name)
