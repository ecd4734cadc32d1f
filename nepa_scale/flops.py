"""Training FLOPs under named conventions, and MFU.

A training step costs 3x its forward pass (forward + backward for activations and weights).
Conventions (every table and figure names the one it uses):

- ``6N``: matmul FLOPs only, 6 x (matmul parameters x the tokens they see): the blocks and
  the final computations see 1 + N tokens, the patch embedding N patches.
- ``6N+attn``: plus attention scores and the weighted sum over the full T x T matrix
  (12 x depth x T^2 x dim), as most papers and the DeepSpeed profiler count SDPA.
- ``6N+attn_causal``: plus only the unmasked pairs of causal attention,
  12 x depth x dim x T(T+1)/2: what a causal kernel actually has to compute.

Norms, RoPE, softmax and other elementwise work are not counted by any convention.
"""

from __future__ import annotations

from nepa_scale.models.arch import NepaArch

CONVENTIONS = ("6N", "6N+attn", "6N+attn_causal")


def matmul_params(arch: NepaArch) -> dict[str, int]:
    """Weights that take part in a matmul per token: per block, patch embedding, head."""
    d, h = arch.dim, arch.hidden
    mlp = (2 if arch.mlp == "gelu" else 3) * d * h
    return {
        "block": 4 * d * d + mlp,
        "patch_embed": d * arch.in_chans * arch.patch_size**2,
        "head": d * arch.num_classes,
    }


def forward_flops(arch: NepaArch, convention: str = "6N+attn") -> float:
    """Forward FLOPs for one image (a multiply-add counts as 2)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention '{convention}' (choose from {', '.join(CONVENTIONS)})")
    tokens, patches = arch.num_tokens, arch.num_patches
    params = matmul_params(arch)
    flops = 2.0 * (arch.depth * params["block"] * tokens + params["patch_embed"] * patches + params["head"])
    if convention == "6N+attn":
        flops += 4.0 * arch.depth * arch.dim * tokens * tokens
    elif convention == "6N+attn_causal":
        flops += 4.0 * arch.depth * arch.dim * tokens * (tokens + 1) / 2
    return flops


def train_flops_per_image(arch: NepaArch, convention: str = "6N+attn") -> float:
    return 3.0 * forward_flops(arch, convention)


def train_flops_per_step(arch: NepaArch, global_batch: int, convention: str = "6N+attn") -> float:
    return global_batch * train_flops_per_image(arch, convention)


def mfu(flops_per_second: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved / peak (both in FLOP/s)."""
    return flops_per_second / peak_flops_per_second
