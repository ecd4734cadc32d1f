"""Predicted peak device memory of a training step, for ``sweep plan``.

peak = model and optimizer states (by precision and ZeRO stage, per rank)
     + activations kept for backward x micro-batch
     + the backward's working set (one block's activations, its gradients)
     + DeepSpeed's fixed buffers (ZeRO-2's contiguous gradient bucket).

Checked against the peaks measured on one H100 (bf16): S, B, L and H/14, eager under ZeRO-2 and
compiled under ZeRO 0-2 (tests/test_launch.py holds them; docs/performance.md says how close).

Activation bytes are not a formula guessed from the architecture: they are counted. One and
two blocks of the real width run a forward pass on the CPU for one image, with autograd's
saved-tensor hooks adding up the storage every saved tensor holds (parameters excluded). The
difference is one block's share; the rest is the embedding and the loss. The CPU's SDPA saves
what a flash kernel saves (output and log-sum-exp, no T x T matrix), so this matches a GPU's
SDPA path; fp32 counts are halved for bf16 (LayerNorm statistics stay fp32, a rounding error).
Compiled blocks (``model.compile``) save less: torch.compile's partitioner recomputes cheap
pointwise results in backward instead of keeping them. The count then runs the blocks through
AOTAutograd with that partitioner (``aot_eager_decomp_partition``: the same choice of saved
tensors as inductor, without generating kernels), which matched the H100's compiled peaks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from nepa_scale.comm import regathered_share
from nepa_scale.models.arch import NepaArch, checkpointed_blocks
from nepa_scale.models.vit import NEPA
from nepa_scale.objective import next_embedding_loss

GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
DEEPSPEED_REDUCE_BUCKET = 5e8  # elements: ZeRO-2's default contiguous gradient buffer


@dataclass(frozen=True)
class MemoryEstimate:
    states_gb: float
    activations_gb: float
    working_gb: float
    buffers_gb: float

    @property
    def peak_gb(self) -> float:
        return self.states_gb + self.activations_gb + self.working_gb + self.buffers_gb


@functools.lru_cache(maxsize=64)
def _saved_bytes(arch: NepaArch, depth: int, grad_checkpointing: bool, compiled: bool = False) -> int:
    """Bytes autograd keeps for one image through ``depth`` blocks (all checkpointed, or none;
    compiled as ``model.compile: blocks`` does, or eager)."""

    torch.manual_seed(0)
    model = NEPA(arch.replace(depth=depth), attention="sdpa", grad_checkpointing=grad_checkpointing)
    if compiled:
        for block in model.blocks:
            block.compile(backend="aot_eager_decomp_partition")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.randn(1, arch.in_chans, arch.image_size, arch.image_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(images)
        next_embedding_loss(out.prediction, out.target)
    return sum(storages.values())


def activation_bytes_per_image(
    arch: NepaArch, precision: str, checkpointed: int, compiled: bool = False
) -> tuple[float, float, float]:
    """Bytes per image with the first ``checkpointed`` blocks keeping only their inputs: (kept for
    backward, one block's full activations, what is still kept when backward reaches the
    checkpointed blocks: the embedding, the loss and those blocks' inputs)."""
    scale = 0.5 if precision == "bf16" else 1.0
    one, two = _saved_bytes(arch, 1, False, compiled), _saved_bytes(arch, 2, False, compiled)
    block_full = two - one
    kept, kept_checkpointed = one - block_full + arch.depth * block_full, 0.0
    if checkpointed:
        one_ck, two_ck = _saved_bytes(arch, 1, True), _saved_bytes(arch, 2, True)
        block_ck = two_ck - one_ck
        kept_checkpointed = one_ck - block_ck + checkpointed * block_ck
        kept = kept_checkpointed + (arch.depth - checkpointed) * block_full
    return kept * scale, block_full * scale, kept_checkpointed * scale


def state_bytes(params: int, precision: str, zero_stage: int, world_size: int) -> tuple[float, float]:
    """(held through backward, extra at the optimizer step) by one rank: weights, grads, AdamW."""
    w = max(world_size, 1)
    if precision == "bf16":
        # bf16 module weights and grads, fp32 master weights and Adam moments. DeepSpeed's ZeRO-2/3
        # optimizer makes its fp32 gradient partition only for the step (after activations are freed);
        # its stage-0/1 bf16 optimizer keeps fp32 gradients for the whole step.
        weights, grads, optimizer = 2 * params, 2 * params, (4 + ADAM_STATE_BYTES) * params
        fp32_grads = 4 * params
    else:
        weights, grads, optimizer, fp32_grads = 4 * params, 4 * params, ADAM_STATE_BYTES * params, 0.0
    if zero_stage >= 1:
        optimizer /= w
        fp32_grads /= w
    if zero_stage >= 2:
        grads /= w
    if zero_stage >= 3:
        # Each rank holds its partition, and DeepSpeed keeps what it gathers in forward until its
        # backward within stage3_max_reuse_distance (nepa_scale/comm.py, measured): all the
        # weights up to L/14, four fifths of H/14's are live through the step as well.
        weights = weights / w + weights * (1 - regathered_share(params))
    if zero_stage >= 2:
        return weights + grads + optimizer, fp32_grads
    return weights + grads + optimizer + fp32_grads, 0.0


def estimate_memory(
    arch: NepaArch,
    params: int,
    *,
    micro_batch: int,
    precision: str,
    zero_stage: int,
    world_size: int,
    grad_checkpointing: bool | int = False,
    compiled: bool = False,
) -> MemoryEstimate:
    """``compiled``: the blocks run compiled (``model.compile: blocks`` or ``model``)."""
    checkpointed = checkpointed_blocks(grad_checkpointing, arch.depth)
    kept, block, kept_checkpointed = activation_bytes_per_image(arch, precision, checkpointed, compiled)
    element = 2 if precision == "bf16" else 4
    buffers = min(DEEPSPEED_REDUCE_BUCKET, params) * element if zero_stage == 2 else 0.0
    # Backward starts with everything kept plus the last block's gradients; on reaching the
    # checkpointed blocks it holds what they kept plus one block recomputed and its gradients. So
    # checkpointing the last block too saves nothing: backward needs its activations at once.
    working = micro_batch * block
    if checkpointed:
        working = max(working, micro_batch * (kept_checkpointed + 2 * block - kept))
    held, at_step = state_bytes(params, precision, zero_stage, world_size)
    # The step's extra fp32 gradients only matter if they outgrow the activations freed before it.
    activations = max(micro_batch * kept + working, at_step)
    return MemoryEstimate(
        states_gb=held / GIB,
        activations_gb=micro_batch * kept / GIB,
        working_gb=(activations - micro_batch * kept) / GIB,
        buffers_gb=buffers / GIB,
    )


def blocks_to_checkpoint(
    arch: NepaArch, params: int, *, memory_gb: float, headroom: float = 0.9, **run: Any
) -> tuple[int, MemoryEstimate]:
    """``grad_checkpointing: auto``: the fewest checkpointed blocks whose predicted peak fits
    ``headroom`` x ``memory_gb`` (all of them, with that estimate, when nothing fits). ``run``: the
    rest of ``estimate_memory``'s settings (micro_batch, precision, zero_stage, world_size)."""
    estimate = None
    for checkpointed in range(arch.depth + 1):
        estimate = estimate_memory(arch, params, grad_checkpointing=checkpointed, **run)
        if estimate.peak_gb <= headroom * memory_gb:
            return checkpointed, estimate
    return arch.depth, estimate


def device_memory_gb(device) -> float:
    """What ``auto`` plans against: the GPU's memory, or this machine's RAM for a CPU run."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB

    return psutil.virtual_memory().total / GIB
