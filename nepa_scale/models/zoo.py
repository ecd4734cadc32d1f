"""A registry of named NEPA sizes, timm style: ``create_model("nepa_b14", pretrained=path)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nepa_scale.models.arch import NepaArch

if TYPE_CHECKING:  # the registry itself stays torch-free so configs validate without importing torch
    from nepa_scale.models.vit import NEPA

_REGISTRY: dict[str, NepaArch] = {}


def register(name: str, arch: NepaArch) -> Callable[..., NEPA]:
    _REGISTRY[name] = arch

    def constructor(pretrained: str | Path | None = None, **kwargs) -> NEPA:
        return create_model(name, pretrained=pretrained, **kwargs)

    constructor.__name__ = name
    constructor.__doc__ = f"NEPA {name}: {arch}"
    return constructor


# A CPU-sized model for tests and demos: 16 px digits with patch 4 (16 patches + [CLS]).
nepa_tiny = register("nepa_tiny", NepaArch(image_size=16, patch_size=4, dim=192, depth=4, num_heads=3))
nepa_s14 = register("nepa_s14", NepaArch(dim=384, depth=12, num_heads=6))
# Released B: qk-norm without affine; released L: with affine.
nepa_b14 = register("nepa_b14", NepaArch(dim=768, depth=12, num_heads=12, qk_norm_affine=False))
nepa_l14 = register("nepa_l14", NepaArch(dim=1024, depth=24, num_heads=16, qk_norm_affine=True))
nepa_h14 = register("nepa_h14", NepaArch(dim=1280, depth=32, num_heads=16, qk_norm_affine=True))


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(name: str, **overrides) -> NepaArch:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(list_models())})")
    return _REGISTRY[name].replace(**overrides) if overrides else _REGISTRY[name]


def create_model(
    name: str,
    pretrained: str | Path | None = None,
    attention: str = "auto",
    grad_checkpointing: bool | int = False,
    **overrides,
) -> NEPA:
    """Build a zoo entry; ``pretrained`` is a local file (ours or the official layout)."""
    from nepa_scale.models.vit import NEPA  # heavy: torch; the zoo's names and sizes need none

    model = NEPA(get_arch(name, **overrides), attention=attention, grad_checkpointing=grad_checkpointing)
    if pretrained is not None:
        from nepa_scale.models.official import load_weights  # heavy: torch, safetensors

        load_weights(model, pretrained)
    return model


def count_params(arch: NepaArch) -> dict[str, int]:
    """Parameter counts computed from the architecture (no model is built)."""
    d, h = arch.dim, arch.hidden
    qkv = 3 * d * d + (3 * d if arch.qkv_bias else 0)
    qk_norm = 2 * arch.head_dim if (arch.qk_norm and arch.qk_norm_affine) else 0
    attn = qkv + qk_norm + d * d + d
    up_matrices = 1 if arch.mlp == "gelu" else 2  # fc1 (+ gate)
    mlp = up_matrices * (d * h + h) + h * d + d
    block = attn + mlp + 2 * 2 * d + 2 * d  # two LayerNorms, two LayerScales
    patch_embed = d * arch.in_chans * arch.patch_size**2 + d
    head = (2 * d + arch.num_classes * d + arch.num_classes) if arch.num_classes > 0 else 0
    total = patch_embed + d + arch.depth * block + 2 * d + head  # + [CLS] + final LN
    return {"total": total, "without_patch_embed": total - patch_embed}
