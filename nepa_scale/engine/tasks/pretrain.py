"""NEPA pretraining: predict each patch's embedding from the patches before it (the recipe's loss,
nepa_scale/objective.py); evaluated by the held-out loss and the label-free diagnostics."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from nepa_scale.config import RunConfig
from nepa_scale.data import build_dataset
from nepa_scale.engine.tasks.base import (
    Evaluation,
    TaskContext,
    backbone_flops,
    decay_groups,
    image_val_dataset,
)
from nepa_scale.eval.diagnostics import effective_rank_from_gram, gap_closed, gram, trivial_prediction_losses
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch
from nepa_scale.objective import next_embedding_loss

if TYPE_CHECKING:  # type hints only
    from nepa_scale.engine.ema import Ema

log = logging.getLogger("nepa_scale.train")


class PretrainTask:
    name = "pretrain"
    eval_each_epoch = False

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self.collapse_warned = False

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        return config.model.arch()

    flops_per_image = staticmethod(backbone_flops)

    @property
    def eval_at_start(self) -> bool:
        """The held-out loss at initialisation, when held-out losses are logged during training."""
        return bool(self.ctx.config.logging.eval_every)

    def build_model(self) -> NEPA:
        c = self.ctx.config
        return NEPA(
            self.ctx.arch,
            attention=c.model.attention,
            grad_checkpointing=self.ctx.settings.checkpointed_blocks,
        )

    def optimizer_groups(self, model: NEPA, peak_lr: float) -> list[dict]:
        return decay_groups(model, self.ctx.config.optim.weight_decay)

    @staticmethod
    def train_dataset(config: RunConfig, arch: NepaArch):
        data = config.data
        return build_dataset(data, "train", arch.image_size, train=True, decode=data.decode)

    val_dataset = staticmethod(image_val_dataset)

    def micro_step(
        self, engine, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        objective = self.ctx.config.objective
        out = engine(images)
        result = next_embedding_loss(
            out.prediction, out.target, stop_gradient=objective.stop_gradient, shift=objective.shift
        )
        return result.loss, {"loss": result.loss.detach(), "target_spread": result.target_spread}

    def annotate(self, record: dict) -> None:
        lg = self.ctx.config.logging
        record["collapsed"] = bool(
            record["loss"] < lg.collapse_loss and record["target_spread"] < lg.collapse_spread
        )
        if record["collapsed"] and not self.collapse_warned:
            log.warning(
                "step %d: loss %.4f with target spread %.4f: the run looks collapsed",
                record["step"],
                record["loss"],
                record["target_spread"],
            )
            self.collapse_warned = True

    @torch.no_grad()
    def evaluate(self, engine, ema: Ema | None, step: int) -> Evaluation:
        """The held-out NEPA loss on the first ``logging.eval_batches`` micro-batches of the val split,
        and on the same images the label-free diagnostics (nepa_scale/eval/diagnostics.py): the
        target spread, the loss of two trivial predictors and the gap the model closes between the
        better one and a perfect prediction, and the effective rank (RankMe) of the pooled features
        and of the patch targets, divided by the width."""

        def score(out, batch) -> dict[str, torch.Tensor]:
            result = next_embedding_loss(out.prediction, out.target)
            trivial = trivial_prediction_losses(out.target)
            return {
                "val_loss": result.loss,
                "val_target_spread": result.target_spread,
                "val_loss_mean_target": trivial["mean_target"],
                "val_loss_copy_last": trivial["copy_last"],
                "gram_features": gram(out.prediction[:, 1:].float().mean(dim=1)),  # NEPA.pool
                "gram_targets": gram(out.target[:, 1:]),
            }

        means = self.ctx.evaluator.held_out(engine, score)
        if means is None:
            return Evaluation()
        values = {k: v.item() for k, v in means.items() if v.numel() == 1}
        trivial = {k: values[f"val_loss_{k}"] for k in ("mean_target", "copy_last")}
        width = self.ctx.arch.dim
        ranks = {k: effective_rank_from_gram(means[f"gram_{k}"]) for k in ("features", "targets")}
        return Evaluation(
            {
                **values,
                "val_gap_closed": gap_closed(values["val_loss"], trivial),
                **{f"rankme_{k}": rank / width for k, rank in ranks.items()},
                **{f"erank_{k}": rank for k, rank in ranks.items()},
            }
        )
