"""What a run optimises: NEPA pretraining or classification fine-tuning, behind one small interface.

The trainer owns everything the two share (DeepSpeed engine, data order, checkpoints, resume,
preemption, metrics). A task gets a narrow ``TaskContext`` (config, arch, world, run directory,
step settings, evaluator), never the trainer, and decides the model, the optimizer groups, the
training data, the loss of one micro-batch, and what "evaluate" means.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nepa_scale.config import RunConfig
from nepa_scale.data import build_dataset, few_labels, to_model_input
from nepa_scale.engine.distributed import World
from nepa_scale.engine.evaluator import Evaluator
from nepa_scale.engine.settings import StepSettings
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch
from nepa_scale.objective import next_embedding_loss
from nepa_scale.rundir import RunDir

if TYPE_CHECKING:
    from nepa_scale.engine.ema import Ema

log = logging.getLogger("nepa_scale.train")


@dataclass(frozen=True)
class TaskContext:
    config: RunConfig
    arch: NepaArch  # the task's architecture (resolve_arch)
    world: World
    run: RunDir
    settings: StepSettings
    evaluator: Evaluator


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (and [CLS]); none on biases, norms and LayerScale (ndim <= 1)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PretrainTask:
    name = "pretrain"
    eval_each_epoch = False

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self.collapse_warned = False

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        return config.model.arch()

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
    def evaluate(self, engine, ema: Ema | None, step: int) -> dict:
        """Held-out NEPA loss on the first ``logging.eval_batches`` micro-batches of the val split."""
        val = self.ctx.evaluator.held_out(
            engine, lambda out, batch: next_embedding_loss(out.prediction, out.target).loss
        )
        return {} if val is None else {"val_loss": val}


class FinetuneTask:
    """The paper's recipe: bidirectional attention, mean-pooled patch tokens -> fc_norm -> zero-initialised
    head, frozen patch embedding, layer-wise lr decay, drop-path, RandAugment, RandomErasing,
    Mixup/CutMix with label smoothing, EMA; top-1 accuracy every epoch, best EMA weights kept."""

    name = "finetune"
    eval_each_epoch = True
    eval_at_start = False

    def __init__(self, ctx: TaskContext):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

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
        self.best_file = ctx.run.root / "best_ema.json"

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        """The zoo arch with a classification head (as many classes as the val split has, unless
        ``finetune.num_classes`` says), the fine-tuning attention and drop-path."""
        ft = config.finetune
        arch = config.model.arch()
        num_classes = ft.num_classes or len(
            build_dataset(config.data, "val", arch.image_size, train=False).classes
        )
        return arch.replace(num_classes=num_classes, causal=ft.causal, drop_path=ft.drop_path)

    def build_model(self) -> NEPA:
        from nepa_scale.models.official import load_weights

        c, ft = self.ctx.config, self.ctx.config.finetune
        model = NEPA(
            self.ctx.arch,
            attention=c.model.attention,
            grad_checkpointing=self.ctx.settings.checkpointed_blocks,
        )
        if ft.pretrained:
            path = Path(ft.pretrained)
            if path.is_dir():
                path = (
                    path / "export" / ("model_ema.safetensors" if ft.pretrained_ema else "model.safetensors")
                )
            load_weights(model, path, head="ignore", qk_norm="fill")
            log.info("fine-tuning from %s", path)
        if ft.freeze_patch_embed:
            model.patch_embed.requires_grad_(False)
        return model

    def optimizer_groups(self, model: NEPA, peak_lr: float) -> list[dict]:
        """timm's layer-wise lr decay groups; each group's lr is the peak lr times its scale."""
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            model,
            weight_decay=self.ctx.config.optim.weight_decay,
            layer_decay=self.ctx.config.finetune.layer_decay,
        )
        for group in groups:
            group["lr"] = peak_lr * group["lr_scale"]
        return groups

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
    def evaluate(self, engine, ema: Ema | None, step: int) -> dict:
        """Top-1 accuracy on the whole val split, online weights and EMA; keep the best EMA weights."""
        ctx = self.ctx

        def correct(out, batch):
            return (out.argmax(-1).cpu() == batch.labels).float().mean()

        result = {"val_acc": ctx.evaluator.held_out(engine, correct, limit=None)}
        if ema is not None and ctx.world.is_main:
            model = ctx.evaluator.ema_model(ema)
            hits = total = 0
            for batch in ctx.evaluator.val_loader():
                logits = model(to_model_input(batch.images, ctx.world.device, torch.float32))
                hits += (logits.argmax(-1).cpu() == batch.labels).sum().item()
                total += len(batch.labels)
            result["val_acc_ema"] = hits / max(total, 1)
            best = json.loads(self.best_file.read_text())["val_acc_ema"] if self.best_file.exists() else -1.0
            if result["val_acc_ema"] > best:
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in ema.state_dict().items()},
                    str(ctx.run.root / "best_ema.safetensors"),
                )
                self.best_file.write_text(json.dumps({"val_acc_ema": result["val_acc_ema"], "step": step}))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return result


TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask}
