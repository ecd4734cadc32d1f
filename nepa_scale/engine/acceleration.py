"""The levers that make a step faster without changing what it computes: torch.compile and
float8 matmuls, applied to the model in place before DeepSpeed wraps it."""

from __future__ import annotations

import torch

from nepa_scale.models import NEPA


def apply_compile(model: NEPA, scope: str, mode: str = "default") -> None:
    """torch.compile in place, before DeepSpeed wraps the model (state-dict keys are unchanged).

    ``blocks`` compiles each transformer block: identical blocks share one compiled graph, so it
    compiles in seconds for any depth, and ZeRO's per-module hooks stay outside the graphs."""
    options = {} if mode == "default" else {"mode": mode}
    if scope == "blocks":
        for block in model.blocks:
            block.compile(**options)
    elif scope == "model":
        model.compile(**options)


def apply_float8(model: torch.nn.Module) -> int:
    """torchao's float8 training for the blocks' linear layers (dynamic tensor-wise scaling), in
    place, before compile and DeepSpeed; the weights stay ordinary parameters, so checkpoints and
    exports are unchanged. Layers whose sides are not multiples of 16 (float8 matmuls' alignment)
    stay as they are. Returns how many layers were converted."""
    from torchao.float8 import convert_to_float8_training  # optional: torchao, for model.float8 only

    def eligible(module: torch.nn.Module, name: str) -> bool:
        return (
            isinstance(module, torch.nn.Linear)
            and ".blocks." in f".{name}"
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    before = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=eligible)
    return before - sum(type(m) is torch.nn.Linear for m in model.modules())
