"""What a training step sends between ranks under DeepSpeed ZeRO, and how long that takes.

The collectives per optimizer step, for P parameters on n ranks with A micro-batches per rank, in
the weights' dtype (bf16: 2 bytes, fp32: 4). Read from DeepSpeed 0.19's ZeRO code and checked
against its communication logger in a 2-process run (``benchmarks/comm_bytes.py``, held within
5% by tests/test_performance.py):

- ZeRO-1: an all-reduce of every gradient once per step, after the last micro-batch's backward;
  an all-gather of the updated parameters after the optimizer step (each rank sends its 1/n).
- ZeRO-2: the same all-reduce after *every* micro-batch (a rank keeps only its partition of the
  gradients, so it cannot accumulate them unreduced); the same all-gather.
- ZeRO-3: a reduce-scatter of the gradients after every micro-batch; an all-gather of the
  parameters in every micro-batch's forward. DeepSpeed keeps a gathered parameter for its
  backward when the parameters fetched in between (the rest of the forward and the backward of
  the later modules: about 2 x the parameters after it) are within ``stage3_max_reuse_distance``
  (1e9 elements by default); the others are gathered again in backward: none up to L/14, about
  a fifth of H/14's parameters (its first blocks). Nothing after the step. (The first step gathers
  everything twice: DeepSpeed is still recording its trace.)

DeepSpeed's ZeRO-1/2 gradient "reduce-scatter" is an all-reduce of each bucket of
``reduce_bucket_size`` elements after which each rank keeps its own slice
(``use_multi_rank_bucket_allreduce``, on by default): twice a reduce-scatter's traffic. Left out: DeepSpeed's scalar agreements (gradient norm,
overflow flag: a few bytes per step) and what it sends once at start-up.

Time follows nccl-tests' bus-bandwidth convention: through each rank's link an all-reduce of S
bytes moves 2(n-1)/n x S, an all-gather or a reduce-scatter (n-1)/n x S (S: the gathered or
reduced size), at ``bus_gbps`` GB/s, plus a fixed latency per call. Within one node the bus
bandwidth is the NVLink figure; across nodes a ring is as fast as each GPU's share of the network.

Overlap, the stated assumption: communication hides only under the backward pass, and only the
gradient buckets DeepSpeed sends before that backward ends, which it does with ``overlap_comm``
(DeepSpeed's default: on for ZeRO-3 only): every bucket but the last, the gradients filling the
buckets at an even rate (ZeRO-1: under the last micro-batch's backward only). Exposed, and added
to the step: every gradient bucket without ``overlap_comm``, the all-gather after the step, and
ZeRO-3's parameter gathers (this harness turns DeepSpeed's prefetch off for a deterministic
schedule). Hidden communication is assumed not to slow the kernels it runs beside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nepa_scale.errors import ConfigError

# DeepSpeed's names, as its communication logger records them.
ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER = "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"


@dataclass(frozen=True)
class ZeroOptions:
    """The DeepSpeed settings that decide what moves when (DeepSpeed's defaults unless the run's
    generated config sets them; ``zero_options`` reads them through DeepSpeed's own config class)."""

    stage: int
    overlap_comm: bool
    reduce_bucket_size: int  # elements
    max_reuse_distance: int = 10**9  # ZeRO-3, elements

    def gathered_again(self, module_params: Sequence[int]) -> list[int]:
        """ZeRO-3: the parameter counts of the modules (in forward order) that are gathered again in
        backward: those with more than ``max_reuse_distance`` elements fetched between their two
        uses, twice the parameters of the modules after them."""
        total, seen, again = sum(module_params), 0, []
        for n in module_params:
            seen += n
            if 2 * (total - seen) > self.max_reuse_distance:
                again.append(n)
        return again


def regathered_share(params: int, max_reuse_distance: int = 10**9) -> float:
    """``ZeroOptions.gathered_again`` for a model of many small modules: the share of its
    parameters gathered again in backward (DeepSpeed's default distance unless given)."""
    return min(1.0, max(0.0, 1 - max_reuse_distance / (2 * params)))


def zero_options(zero_optimization: dict[str, Any]) -> ZeroOptions:
    """A run's ``zero_optimization`` section with DeepSpeed's defaults filled in by DeepSpeed."""
    # heavy: DeepSpeed (its import prints to stdout), only when a plan reads ZeRO's defaults
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        z = DeepSpeedZeroConfig(**zero_optimization)
    except ValueError as exc:  # pydantic's ValidationError: an unknown key or a refused value
        detail = " ".join(str(exc).split(" For further information")[0].split())
        raise ConfigError(
            f"deepspeed: DeepSpeed refuses zero_optimization {zero_optimization}: {detail}"
        ) from None
    return ZeroOptions(
        int(z.stage), bool(z.overlap_comm), int(z.reduce_bucket_size), int(z.max_reuse_distance)
    )


@dataclass(frozen=True)
class Collective:
    op: str  # ALL_REDUCE | ALL_GATHER | REDUCE_SCATTER
    what: str
    message_bytes: float  # per call, as DeepSpeed's logger counts it: the tensor handed to the op
    buckets: int  # calls per round
    rounds: int  # per optimizer step: once, or once per micro-batch
    overlappable: bool  # gradient buckets, sent while the backward pass still runs (overlap_comm)

    @property
    def calls(self) -> int:
        return self.buckets * self.rounds

    @property
    def logged_bytes(self) -> float:
        """Per step, as DeepSpeed's logger adds it up (an all-gather logs each rank's input)."""
        return self.message_bytes * self.calls

    def bus_bytes(self, world_size: int) -> float:
        """Bytes through each rank's link per step (ring algorithms)."""
        n = world_size
        if self.op == ALL_REDUCE:
            return 2 * (n - 1) / n * self.logged_bytes
        if self.op == ALL_GATHER:  # logged: one rank's share of the gathered tensor
            return (n - 1) * self.logged_bytes
        return (n - 1) / n * self.logged_bytes  # reduce-scatter, logged: the whole input


def step_collectives(
    params: int,
    world_size: int,
    accumulation: int,
    element_bytes: int,
    zero: ZeroOptions,
    module_params: Sequence[int] = (),
) -> list[Collective]:
    """The collectives of one optimizer step (steady state). ``module_params``: the parameter
    counts of the modules that own parameters, in forward order (ZeRO-3 gathers each module's
    parameters in its own call); default: one module."""
    if world_size == 1 or zero.stage == 0:
        return []  # one rank talks to nobody; ZeRO-0 (DeepSpeed's plain data parallel) is not modelled
    size = params * element_bytes
    buckets = math.ceil(params / zero.reduce_bucket_size)
    if zero.stage in (1, 2):
        rounds = 1 if zero.stage == 1 else accumulation  # ZeRO-1: the last micro-batch's backward
        return [
            Collective(ALL_REDUCE, "gradients", size / buckets, buckets, rounds, True),
            Collective(ALL_GATHER, "parameters after the step", size / world_size, 1, 1, False),
        ]
    modules = list(module_params) or [params]
    forward = size / world_size / len(modules)
    gathers = [Collective(ALL_GATHER, "parameters for forward", forward, len(modules), accumulation, False)]
    again = zero.gathered_again(modules)
    if again:
        share = sum(again) * element_bytes / world_size / len(again)
        gathers.append(
            Collective(ALL_GATHER, "parameters again for backward", share, len(again), accumulation, False)
        )
    return [Collective(REDUCE_SCATTER, "gradients", size / buckets, buckets, accumulation, True), *gathers]


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # the step on one device at this micro-batch and accumulation
    comm_s: float  # every collective, back to back
    exposed_s: float  # what is not hidden under backward

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s

    @property
    def efficiency(self) -> float:
        """Throughput per device against the same device alone (no communication)."""
        return self.compute_s / self.step_s


def step_time(
    collectives: list[Collective],
    world_size: int,
    *,
    compute_s: float,
    backward_s: float,
    accumulation: int,
    bus_gbps: float,
    latency_s: float,
    overlap_comm: bool,
) -> StepTime:
    """``backward_s``: the backward passes' share of ``compute_s`` (all micro-batches)."""
    comm = exposed = 0.0
    for c in collectives:
        seconds = c.bus_bytes(world_size) / (bus_gbps * 1e9) + c.calls * latency_s
        comm += seconds
        if not (c.overlappable and overlap_comm):
            exposed += seconds
            continue
        # Each round's buckets go as they fill; the last one waits for the end of its backward.
        per_round, backward = seconds / c.rounds, backward_s / accumulation
        hidden_room = backward * (c.buckets - 1) / c.buckets
        exposed += c.rounds * max(per_round / c.buckets, per_round - hidden_room)
    return StepTime(compute_s, comm, exposed)
