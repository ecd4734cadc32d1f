"""Classification fine-tuning, the paper's recipe (docs/recipe.md): a pretrained backbone, a head,
timm's augmentations, Mixup/CutMix and layer-wise lr decay; top-1 accuracy, best EMA weights kept."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from nepa_scale.config import RunConfig
from nepa_scale.data import build_dataset, few_labels, to_model_input
from nepa_scale.engine.tasks.base import (
    Evaluation,
    TaskContext,
    backbone_flops,
    image_val_dataset,
    layer_decay_groups,
    load_pretrained,
)
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch

if TYPE_CHECKING:  # type hints only
    from nepa_scale.engine.ema import Ema


class FinetuneTask:
    """The paper's recipe: bidirectional attention, mean-pooled patch tokens -> fc_norm -> zero-initialised
    head, frozen patch embedding, layer-wise lr decay, drop-path, RandAugment, RandomErasing,
    Mixup/CutMix with label smoothing, EMA; top-1 accuracy every epoch, best EMA weights kept."""

    name = "finetune"
    eval_each_epoch = True
    eval_at_start = False

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        ft = ctx.config.finetune
        self.mixup = (
            Mixup(
                mixup_alpha=ft.mixup,
                cutmix_alpha=ft.cutmix,
                label_smoothing=ft.smoothing,
                num_classes=ctx.arch.num_classes,
            )
            if ft.mixup > 0 or ft.cutmix > 0
            else None
        )
        self.criterion = SoftTargetCrossEntropy() if self.mixup else LabelSmoothingCrossEntropy(ft.smoothing)

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        """The zoo arch with a classification head (as many classes as the val split has, unless
        ``finetune.num_classes`` says), the fine-tuning attention and drop-path."""
        ft = config.finetune
        arch = config.model.arch()
        num_classes = ft.num_classes or len(image_val_dataset(config, arch).classes)
        return arch.replace(num_classes=num_classes, causal=ft.causal, drop_path=ft.drop_path)

    flops_per_image = staticmethod(backbone_flops)

    def build_model(self) -> NEPA:
        c, ft = self.ctx.config, self.ctx.config.finetune
        model = NEPA(
            self.ctx.arch,
            attention=c.model.attention,
            grad_checkpointing=self.ctx.settings.checkpointed_blocks,
        )
        load_pretrained(model, ft.pretrained, ft.pretrained_ema, "finetune.pretrained")
        if ft.freeze_patch_embed:
            model.patch_embed.requires_grad_(False)
        return model

    def optimizer_groups(self, model: NEPA, peak_lr: float) -> list[dict]:
        return layer_decay_groups(
            model, peak_lr, self.ctx.config.optim.weight_decay, self.ctx.config.finetune.layer_decay
        )

    @staticmethod
    def train_dataset(config: RunConfig, arch: NepaArch):
        ft = config.finetune
        dataset = build_dataset(
            config.data,
            "train",
            arch.image_size,
            train=True,
            auto_augment=ft.auto_augment,
            re_prob=ft.re_prob,
        )
        return few_labels(dataset, ft.label_fraction)

    val_dataset = staticmethod(image_val_dataset)

    def micro_step(
        self, engine, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = labels.to(images.device)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        else:
            targets = labels
        logits = engine(images).float()
        loss = self.criterion(logits, targets)
        return loss, {"loss": loss.detach()}

    def annotate(self, record: dict) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, engine, ema: Ema | None, step: int) -> Evaluation:
        """Top-1 accuracy on the whole val split, online weights and EMA (the EMA's, scored on rank
        0, is what the best weights are kept by)."""
        ctx = self.ctx

        def correct(out, batch):
            return (out.argmax(-1).cpu() == batch.labels).float().mean()

        means = ctx.evaluator.held_out(
            engine, lambda out, batch: {"val_acc": correct(out, batch)}, limit=None
        )
        evaluation = Evaluation({"val_acc": means["val_acc"].item() if means else None})
        if ema is not None and ctx.world.is_main:
            model = ctx.evaluator.ema_model(ema)
            hits = total = 0
            for batch in ctx.evaluator.val_loader():
                logits = model(to_model_input(batch.images, ctx.world.device, torch.float32))
                hits += (logits.argmax(-1).cpu() == batch.labels).sum().item()
                total += len(batch.labels)
            evaluation.metrics["val_acc_ema"] = evaluation.best_score = hits / max(total, 1)
        return evaluation
