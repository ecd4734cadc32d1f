"""Scaled dot-product attention behind one setting: ``auto | sdpa | xformers | math``.

All backends take and return ``[batch, heads, tokens, head_dim]`` tensors and compute
softmax(q k^T / sqrt(head_dim) + mask) v with an optional lower-triangular (causal) mask.
``math`` is the explicit reference; ``sdpa`` is PyTorch's fused kernel dispatcher;
``xformers`` is ``memory_efficient_attention`` (CUDA only, and only when its wheel was built
for the installed torch: a mismatched wheel imports with a warning and fails at the first call).
"""

from __future__ import annotations

import logging
import math
from functools import cache

import torch
import torch.nn.functional as F

from nepa_scale.errors import BackendUnavailable
from nepa_scale.models.arch import BACKENDS

log = logging.getLogger(__name__)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Reference: explicit scores, additive -inf mask above the diagonal, fp32 softmax."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    import xformers.ops as xops  # optional: xformers (CUDA only)

    # xformers wants [B, M, H, K]; we carry [B, H, M, K].
    bias = xops.LowerTriangularMask() if causal else None
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


_KERNELS = {"math": math_attention, "sdpa": sdpa_attention, "xformers": xformers_attention}


@cache
def xformers_unavailable_reason(device_type: str, dtype: torch.dtype) -> str | None:
    """Why xformers cannot run here (None when a one-time probe call succeeded)."""
    if device_type != "cuda":
        return f"xformers has no kernels for device '{device_type}'"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising at import
        return f"xformers does not import ({type(exc).__name__}: {exc})"
    try:
        probe = torch.randn(1, 2, 8, 64, device=device_type, dtype=dtype)
        xformers_attention(probe, probe, probe, causal=True)
    except Exception as exc:  # typically "No operator found for memory_efficient_attention_forward"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"xformers probe call failed on {device_type}/{dtype}: {first_line}"
    return None


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """Turn the user's setting into a concrete backend, logging the choice for ``auto``."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend '{requested}' (choose from {', '.join(BACKENDS)})")
    device_type = torch.device(device).type
    if requested == "xformers":
        reason = xformers_unavailable_reason(device_type, dtype)
        if reason is not None:
            raise BackendUnavailable(f"model.attention: 'xformers' was requested but cannot run: {reason}")
        return "xformers"
    if requested != "auto":
        return requested
    reason = xformers_unavailable_reason(device_type, dtype)
    chosen = "xformers" if reason is None else "sdpa"
    _log_auto_choice(chosen, reason or "xformers probe succeeded", device_type, str(dtype))
    return chosen


@cache
def _log_auto_choice(chosen: str, why: str, device_type: str, dtype: str) -> None:
    log.info("attention backend auto -> %s on %s/%s (%s)", chosen, device_type, dtype, why)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str) -> torch.Tensor:
    """Dispatch to a concrete backend (``auto`` is resolved on the first call for q's device/dtype)."""
    if backend == "auto":
        backend = resolve_backend("auto", q.device, q.dtype)
    return _KERNELS[backend](q, k, v, causal)
