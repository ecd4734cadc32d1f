"""The architecture description, free of torch so configs validate in milliseconds."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

BACKENDS = ("auto", "sdpa", "xformers", "math")


def checkpointed_blocks(setting: bool | int, depth: int) -> int:
    """How many blocks (the first ones) recompute their activations in backward: true = all."""
    if isinstance(setting, bool):
        return depth if setting else 0
    if not 0 <= setting <= depth:
        raise ValueError(f"grad_checkpointing: {setting} blocks, but the model has {depth}")
    return setting


MLP_KINDS = ("gelu", "swiglu", "geglu")
ROPE_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class NepaArch:
    """Everything that defines the network's shape and numerics (not how it is trained)."""

    image_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp: str = "gelu"  # gelu: fc2(gelu(fc1 x)); swiglu/geglu: fc2(act(gate x) * fc1 x)
    mlp_hidden: int | None = None  # default: 4*dim (gelu); 2/3 * 4*dim rounded up to 64 (gated)
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_affine: bool = False  # off for the released B, on for L
    layerscale_init: float = 1e-5
    norm_eps: float = 1e-12
    rope_theta: float = 100.0
    rope_rescale: float | None = 2.0  # train-time log-uniform coordinate rescale in [1/r, r]
    # RoPE's cos/sin and, for bf16 activations, its arithmetic: fp32 (the released models) or bf16
    # (DINOv3's option: half the bytes where RoPE is not fused; docs/performance.md: the numerics).
    rope_dtype: str = "fp32"
    init_std: float = 0.02
    causal: bool = True  # pretraining; classification uses bidirectional attention
    num_classes: int = 0  # > 0 adds fc_norm + zero-initialised Linear head
    drop_path: float = 0.0  # stochastic depth (fine-tuning only), linear over depth

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.rope_dtype not in ROPE_DTYPES:
            raise ValueError(f"unknown rope_dtype '{self.rope_dtype}' (choose from {', '.join(ROPE_DTYPES)})")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp '{self.mlp}' (choose from {', '.join(MLP_KINDS)})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.dim
        # Gated MLPs have three matrices: 2/3 of 4*dim keeps the parameter count of the GeLU MLP.
        return 64 * math.ceil(8 * self.dim / 3 / 64)

    def replace(self, **changes) -> NepaArch:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(unknown)}")
        return NepaArch(**{**asdict(self), **changes})
