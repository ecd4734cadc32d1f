"""The step settings of a run, resolved in one place for the trainer, ``sweep plan`` and ``bench``;
and the checks a run passes before anything heavy starts (the world size, the optional loggers).

Precision, micro-batch, gradient-accumulation steps, activation-checkpointed blocks and the
predicted peak memory per device follow from the config, the world size and the device; the
planner asks before any device exists (the profile says what the device will be).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nepa_scale.config import LoggingConfig, RunConfig
from nepa_scale.errors import ConfigError
from nepa_scale.models.arch import NepaArch, checkpointed_blocks
from nepa_scale.models.zoo import count_params

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StepSettings:
    precision: str  # fp32 | bf16
    micro_batch: int  # per process
    accumulation_steps: int  # micro-batches per optimizer step and process
    checkpointed_blocks: int  # blocks under activation checkpointing
    predicted_memory_gb: float | None  # the memory model's peak per device (None: not asked for)

    @property
    def dtype(self) -> torch.dtype:
        import torch  # heavy: `nepa-scale train` checks the world size before the engine starts

        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def check_world(config: RunConfig, world_size: int) -> int:
    """The micro-batch per process for this world size; a ConfigError if the batch does not divide."""
    b = config.budget
    micro = b.micro_batch if b.micro_batch is not None else b.global_batch // world_size
    if micro <= 0 or b.global_batch % (world_size * micro):
        raise ConfigError(
            f"budget.global_batch: {b.global_batch} is not divisible by world size {world_size} x micro_batch {micro}"
        )
    return micro


# The optional loggers: the setting, the module it needs, what to install.
LOGGERS = (("tensorboard", "tensorboard", "tensorboard"), ("wandb_project", "wandb", "wandb"))


def check_loggers(logging_config: LoggingConfig) -> None:
    """The packages of the loggers asked for are installed: a ConfigError naming the setting, said
    before the engine starts (not when the first metric is written, with the run recorded running)."""
    for key, module, package in LOGGERS:
        if getattr(logging_config, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{key}: needs the {package} package (pip install {package})")


def resolve_precision(setting: str, device_type: str) -> str:
    """``deepspeed.precision``; auto is bf16 on GPUs and fp32 on the CPU."""
    if setting != "auto":
        return setting
    return "bf16" if device_type == "cuda" else "fp32"


def resolve_step_settings(
    config: RunConfig,
    arch: NepaArch,
    world_size: int,
    device_type: str,
    memory_gb: float | None = None,
    predict_memory: bool = False,
) -> StepSettings:
    """The settings of one optimizer step. ``grad_checkpointing: auto`` needs ``memory_gb`` (the
    device's memory) and picks the fewest blocks whose predicted peak fits 90% of it; the memory
    model also runs when ``predict_memory`` is asked for (it compiles blocks for compiled runs)."""
    # heavy: torch (the memory model measures a forward pass); check_world, above, needs none of it
    from nepa_scale.memory import blocks_to_checkpoint, estimate_memory

    micro = check_world(config, world_size)
    precision = resolve_precision(config.deepspeed.precision, device_type)
    run = dict(
        micro_batch=micro,
        precision=precision,
        zero_stage=config.deepspeed.zero_stage,
        world_size=world_size,
        compiled=config.model.compiled,
    )
    params = count_params(arch)["total"]
    setting = config.model.grad_checkpointing
    predicted = None
    if setting == "auto":
        if memory_gb is None:
            raise ValueError("model.grad_checkpointing=auto needs the device's memory")
        blocks, estimate = blocks_to_checkpoint(arch, params, memory_gb=memory_gb, **run)
        predicted = estimate.peak_gb
    else:
        blocks = checkpointed_blocks(setting, arch.depth)
        if predict_memory:
            predicted = estimate_memory(arch, params, grad_checkpointing=blocks, **run).peak_gb
    return StepSettings(
        precision=precision,
        micro_batch=micro,
        accumulation_steps=config.budget.global_batch // (micro * world_size),
        checkpointed_blocks=blocks,
        predicted_memory_gb=predicted,
    )
