"""The NEPA Vision Transformer, top to bottom as in the recipe (docs/recipe.md).

images -> Conv2d patch embedding -> prepend [CLS] -> pre-norm blocks (QK-LayerNorm, 2D RoPE on
patch tokens, causal or bidirectional attention, LayerScale on both branches) -> final LayerNorm.

In pretraining the final-LN output is the prediction z_hat and the raw embedding sequence
(patch embedding output with [CLS]) is the target z; see ``nepa_scale.objective``.
For classification the patch tokens are mean-pooled, normalised (fc_norm) and fed to a
zero-initialised Linear head.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nepa_scale.models.arch import BACKENDS, NepaArch, checkpointed_blocks
from nepa_scale.models.attention import attention, resolve_backend


class PatchEmbed(nn.Module):
    """Conv2d with kernel = stride = patch size; tokens in raster (row-major) order."""

    def __init__(self, arch: NepaArch):
        super().__init__()
        self.patch_size = arch.patch_size
        self.proj = nn.Conv2d(arch.in_chans, arch.dim, kernel_size=arch.patch_size, stride=arch.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch_size {self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


class Rope2D(nn.Module):
    """DINOv3-style 2D rotary embedding for patch tokens; the [CLS] row is the identity rotation.

    Patch-centre coordinates in [-1, 1] per axis, inverse frequencies theta^(-4k/head_dim),
    angle = 2*pi*coord*freq, y- and x-angles concatenated then tiled to head_dim (rotate-half
    convention), in fp32; cos and sin then in ``arch.rope_dtype`` (for bf16 activations, the
    dtype ``apply_rope`` rotates in).
    In training mode every coordinate is multiplied by one log-uniform
    factor in [1/rescale, rescale] per forward pass, shared across the batch.
    """

    inv_freq: torch.Tensor

    def __init__(self, arch: NepaArch):
        super().__init__()
        self.rescale = arch.rope_rescale
        self.dtype = torch.bfloat16 if arch.rope_dtype == "bf16" else torch.float32
        inv_freq = 1.0 / arch.rope_theta ** torch.arange(0, 1, 4 / arch.head_dim, dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @staticmethod
    def patch_centres(rows: int, cols: int, device: torch.device) -> torch.Tensor:
        ys = 2 * (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) / rows - 1
        xs = 2 * (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) / cols - 1
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (rows*cols, 2)

    def forward(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (1 + rows*cols, head_dim) in the rotation's dtype, with an identity
        row for [CLS]."""
        # fp32 whatever the autocast; meta tensors (FLOP counting) have no autocast to leave
        no_autocast = torch.autocast(device.type, enabled=False) if device.type != "meta" else nullcontext()
        with no_autocast:
            coords = self.patch_centres(rows, cols, device)
            if self.training and self.rescale is not None:
                log_r = math.log(self.rescale)
                factor = torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
                coords = coords * factor
            angles = 2 * math.pi * coords[:, :, None] * self.inv_freq.to(device)[None, None, :]
            angles = angles.flatten(1, 2).tile(2)
            cls_row = torch.zeros(1, angles.shape[1], device=device)
            angles = torch.cat([cls_row, angles])
            return angles.cos().to(self.dtype), angles.sin().to(self.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate in the wider of x's and cos's dtypes (fp32 cos/sin: fp32 arithmetic for bf16
    activations; bf16 cos/sin: bf16 arithmetic for bf16 activations), return in x's (the [CLS]
    row has cos=1, sin=0: unchanged)."""
    xr = x.to(torch.promote_types(x.dtype, cos.dtype))
    return (xr * cos + rotate_half(xr) * sin).to(x.dtype)


class Attention(nn.Module):
    """Fused qkv projection, per-head QK-LayerNorm before RoPE, causal or bidirectional."""

    def __init__(self, arch: NepaArch, backend: str):
        super().__init__()
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.causal = arch.causal
        self.backend = backend
        self.qkv = nn.Linear(arch.dim, 3 * arch.dim, bias=arch.qkv_bias)
        if arch.qk_norm:
            norm = dict(eps=arch.norm_eps, elementwise_affine=arch.qk_norm_affine, bias=False)
            self.q_norm: nn.Module = nn.LayerNorm(arch.head_dim, **norm)
            self.k_norm: nn.Module = nn.LayerNorm(arch.head_dim, **norm)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.proj = nn.Linear(arch.dim, arch.dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        v = v.to(q.dtype)
        out = attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """GeLU MLP (released weights) or a gated variant (paper: SwiGLU) with act(gate x) * up x."""

    def __init__(self, arch: NepaArch):
        super().__init__()
        self.fc1 = nn.Linear(arch.dim, arch.hidden)
        self.gate = nn.Linear(arch.dim, arch.hidden) if arch.mlp != "gelu" else None
        self.act = F.silu if arch.mlp == "swiglu" else F.gelu
        self.fc2 = nn.Linear(arch.hidden, arch.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.fc2(self.act(self.fc1(x)))
        return self.fc2(self.act(self.gate(x)) * self.fc1(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Per-sample stochastic depth; identity at rate 0 or in eval mode."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """x = x + LS1 * Attn(LN1(x)); x = x + LS2 * MLP(LN2(x))."""

    def __init__(self, arch: NepaArch, backend: str, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.dim, eps=arch.norm_eps)
        self.attn = Attention(arch, backend)
        self.ls1 = LayerScale(arch.dim, arch.layerscale_init)
        self.norm2 = nn.LayerNorm(arch.dim, eps=arch.norm_eps)
        self.mlp = Mlp(arch)
        self.ls2 = LayerScale(arch.dim, arch.layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class NepaOutput(NamedTuple):
    prediction: torch.Tensor  # final-LN output z_hat, (B, 1+N, D)
    target: torch.Tensor  # raw embedding sequence z with [CLS], (B, 1+N, D), not detached


class NEPA(nn.Module):
    """One backbone for causal pretraining and bidirectional classification."""

    def __init__(self, arch: NepaArch, attention: str = "auto", grad_checkpointing: bool | int = False):
        """``grad_checkpointing``: True recomputes every block's activations in backward, an integer
        the first N blocks' (as few as the memory needs: each one costs a block's forward again)."""
        super().__init__()
        if attention not in BACKENDS:
            raise ValueError(f"unknown attention backend '{attention}' (choose from {', '.join(BACKENDS)})")
        self.arch = arch
        self.checkpointed_blocks = checkpointed_blocks(grad_checkpointing, arch.depth)
        self.patch_embed = PatchEmbed(arch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.dim))
        self.rope = Rope2D(arch)
        rates = [arch.drop_path * i / max(1, arch.depth - 1) for i in range(arch.depth)]
        self.blocks = nn.ModuleList(Block(arch, attention, rate) for rate in rates)
        self.norm = nn.LayerNorm(arch.dim, eps=arch.norm_eps)
        if arch.num_classes > 0:
            self.fc_norm = nn.LayerNorm(arch.dim, eps=arch.norm_eps)
            self.head = nn.Linear(arch.dim, arch.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.arch.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LayerScale):
                nn.init.constant_(module.gamma, module.init)
        nn.init.trunc_normal_(self.cls_token, std=std)
        if self.arch.num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise lr decay (as timm's ViT): embeddings, each block, the rest."""
        return {
            "stem": r"^cls_token|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    @property
    def causal(self) -> bool:
        return self.blocks[0].attn.causal

    def set_attention(self, *, causal: bool | None = None, backend: str | None = None) -> None:
        """Switch every block between causal/bidirectional attention or to another backend."""
        for block in self.blocks:
            if causal is not None:
                block.attn.causal = causal
            if backend is not None:
                resolve_backend(backend, self.cls_token.device, self.cls_token.dtype)
                block.attn.backend = backend

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The raw embedding sequence: [CLS] followed by the patch embeddings, (B, 1+N, D)."""
        patches = self.patch_embed(images)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)

    def run_blocks(
        self, tokens: torch.Tensor, rows: int, cols: int, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks over ``tokens``: the last output, and the outputs of the 1-based blocks in
        ``keep`` (segmentation's features); stops after the last block asked for, if any."""
        rope = self.rope(rows, cols, tokens.device)
        x, kept = tokens, []
        last = max(keep) if keep else len(self.blocks)
        for i, block in enumerate(self.blocks[:last]):
            if self.training and i < self.checkpointed_blocks:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
            kept.extend([x] * keep.count(i + 1))
        return x, kept

    def encode(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return self.norm(self.run_blocks(tokens, rows, cols)[0])

    def block_grids(self, images: torch.Tensor, blocks: tuple[int, ...]) -> list[torch.Tensor]:
        """The patch tokens after each of ``blocks`` (1-based) as (B, dim, rows, cols) grids."""
        p = self.arch.patch_size
        rows, cols = images.shape[-2] // p, images.shape[-1] // p
        _, kept = self.run_blocks(self.embed(images), rows, cols, keep=blocks)
        return [x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, rows, cols) for x in kept]

    def forward_features(self, images: torch.Tensor) -> NepaOutput:
        embeddings = self.embed(images)
        p = self.arch.patch_size
        prediction = self.encode(embeddings, images.shape[-2] // p, images.shape[-1] // p)
        return NepaOutput(prediction=prediction, target=embeddings)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens of the final-LN output (the [CLS] token is left out)."""
        return features[:, 1:].mean(dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.pool(features)))

    def forward(self, images: torch.Tensor) -> NepaOutput | torch.Tensor:
        """Pretraining models return (prediction, target); classifiers return logits."""
        out = self.forward_features(images)
        if self.arch.num_classes > 0:
            return self.forward_head(out.prediction)
        return out
