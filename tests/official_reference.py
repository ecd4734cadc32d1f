"""An independent, functional forward pass over an *official-layout* state dict.

Written from the recipe and the official key table (docs/recipe.md, docs/official_layout.md), not
from our model code: separate query/key/value matrices, the official module names, RoPE on patch
tokens only.
Tests load the same dict into our model and require the same hidden states and loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

P = "vit_nepa."


def rope_tables(grid: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], dim=-1)  # raster order, (y, x)
    inv_freq = theta ** (-4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim)
    angles = 2 * math.pi * coords[:, :, None] * inv_freq  # (N, 2, head_dim/4)
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)  # y-angles then x-angles
    angles = torch.cat([angles, angles], dim=-1)  # tiled to head_dim
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def official_forward(
    sd: dict[str, torch.Tensor],
    images: torch.Tensor,
    *,
    num_heads: int,
    patch: int,
    causal: bool = True,
    eps: float = 1e-12,
    theta: float = 100.0,
    act=F.gelu,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final-LN output, embedding sequence with [CLS], NEPA loss) in eval mode."""
    w = sd[P + "embeddings.patch_embeddings.projection.weight"]
    patches = F.conv2d(images, w, sd[P + "embeddings.patch_embeddings.projection.bias"], stride=patch)
    patches = patches.flatten(2).transpose(1, 2)
    b, n, d = patches.shape
    z = torch.cat([sd[P + "embeddings.cls_token"].expand(b, 1, d), patches], dim=1)
    head_dim = d // num_heads
    cos, sin = rope_tables(int(math.isqrt(n)), head_dim, theta)
    h = z
    layers = sorted({int(k.split(".")[3]) for k in sd if k.startswith(P + "encoder.layer.")})
    for i in layers:
        pre = f"{P}encoder.layer.{i}."

        def lin(x, name, pre=pre):
            return F.linear(x, sd[pre + name + ".weight"], sd.get(pre + name + ".bias"))

        y = F.layer_norm(h, (d,), sd[pre + "layernorm_before.weight"], sd[pre + "layernorm_before.bias"], eps)
        q, k, v = (
            lin(y, f"attention.attention.{name}").view(b, n + 1, num_heads, head_dim).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        q = F.layer_norm(q, (head_dim,), sd.get(pre + "attention.attention.q_norm.weight"), None, eps)
        k = F.layer_norm(k, (head_dim,), sd.get(pre + "attention.attention.k_norm.weight"), None, eps)
        q = torch.cat([q[:, :, :1], rotate(q[:, :, 1:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :1], rotate(k[:, :, 1:], cos, sin)], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if causal:
            scores = scores + torch.full((n + 1, n + 1), float("-inf")).triu(1)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n + 1, d)
        h = h + lin(attn, "attention.output.dense") * sd[pre + "layer_scale.lambda1"]
        y = F.layer_norm(h, (d,), sd[pre + "layernorm_after.weight"], sd[pre + "layernorm_after.bias"], eps)
        up = lin(y, "intermediate.up_proj")
        mid = (
            act(lin(y, "intermediate.gate_proj")) * up
            if pre + "intermediate.gate_proj.weight" in sd
            else act(up)
        )
        h = h + lin(mid, "output.dense") * sd[pre + "output.layer_scale.lambda1"]
    out = F.layer_norm(h, (d,), sd[P + "layernorm.weight"], sd[P + "layernorm.bias"], eps)
    loss = -(F.normalize(out[:, :-1], dim=-1) * F.normalize(z[:, 1:], dim=-1)).sum(-1).mean()
    return out, z, loss


def official_state_dict(
    *,
    dim: int,
    depth: int,
    heads: int,
    mlp: int,
    patch: int,
    qk_affine: bool,
    gated: bool,
    classes: int = 0,
    seed: int = 0,
    scale: float = 0.05,
) -> dict[str, torch.Tensor]:
    """Random tensors under exactly the official key names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(*shape, generator=g)

    sd = {
        P + "embeddings.cls_token": rnd(1, 1, dim),
        P + "embeddings.patch_embeddings.projection.weight": rnd(dim, 3, patch, patch),
        P + "embeddings.patch_embeddings.projection.bias": rnd(dim),
        P + "layernorm.weight": rnd(dim, base=1.0),
        P + "layernorm.bias": rnd(dim),
    }
    for i in range(depth):
        pre = f"{P}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            sd[f"{pre}attention.attention.{name}.weight"] = rnd(dim, dim)
            sd[f"{pre}attention.attention.{name}.bias"] = rnd(dim)
        if qk_affine:
            sd[f"{pre}attention.attention.q_norm.weight"] = rnd(dim // heads, base=1.0)
            sd[f"{pre}attention.attention.k_norm.weight"] = rnd(dim // heads, base=1.0)
        sd[f"{pre}attention.output.dense.weight"] = rnd(dim, dim)
        sd[f"{pre}attention.output.dense.bias"] = rnd(dim)
        sd[f"{pre}layer_scale.lambda1"] = rnd(dim, base=0.5)
        sd[f"{pre}intermediate.up_proj.weight"] = rnd(mlp, dim)
        sd[f"{pre}intermediate.up_proj.bias"] = rnd(mlp)
        if gated:
            sd[f"{pre}intermediate.gate_proj.weight"] = rnd(mlp, dim)
            sd[f"{pre}intermediate.gate_proj.bias"] = rnd(mlp)
        sd[f"{pre}output.dense.weight"] = rnd(dim, mlp)
        sd[f"{pre}output.dense.bias"] = rnd(dim)
        sd[f"{pre}output.layer_scale.lambda1"] = rnd(dim, base=0.5)
        for ln in ("layernorm_before", "layernorm_after"):
            sd[f"{pre}{ln}.weight"] = rnd(dim, base=1.0)
            sd[f"{pre}{ln}.bias"] = rnd(dim)
    if classes:
        sd["fc_norm.weight"] = rnd(dim, base=1.0)
        sd["fc_norm.bias"] = rnd(dim)
        sd["classifier.weight"] = rnd(classes, dim)
        sd["classifier.bias"] = rnd(classes)
    return sd
