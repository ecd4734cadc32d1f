"""What a run optimises: NEPA pretraining, classification fine-tuning or semantic segmentation,
behind one small interface.

The trainer owns everything the tasks share (DeepSpeed engine, data order, checkpoints, resume,
preemption, metrics). A task gets a narrow ``TaskContext`` (config, arch, world, run directory,
step settings, evaluator), never the trainer, and decides the model, the optimizer groups, the
training and evaluation data, the loss of one micro-batch, and what "evaluate" means.
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
from nepa_scale.errors import ConfigError
from nepa_scale.eval.diagnostics import effective_rank_from_gram, gap_closed, gram, trivial_prediction_losses
from nepa_scale.flops import train_flops_per_image
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch
from nepa_scale.objective import next_embedding_loss
from nepa_scale.rundir import RunDir, follow_umask

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


def layer_decay_groups(
    model: torch.nn.Module, peak_lr: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """timm's layer-wise lr decay groups (the model's ``group_matcher``); each group's lr is the peak
    lr times its scale."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = peak_lr * group["lr_scale"]
    return groups


def load_pretrained(backbone: NEPA, pretrained: str | None, ema: bool, key: str) -> None:
    """Backbone weights from a file (ours or the official layout) or a run directory's export/; the
    pretraining head, if any, is left out and a missing QK-norm is filled with identity."""
    from nepa_scale.models.official import load_weights

    if not pretrained:
        return
    path = Path(pretrained)
    if path.is_dir():
        from nepa_scale.engine.export import stale_export

        stale = stale_export(path)
        if stale is not None:  # weights of another step than the run's newest: refused, never taken silently
            held, newest = stale
            what = "no export" if held is None else f"the export of step {held}"
            raise ConfigError(
                f"{key}: {path} has {what}, but its newest "
                f"checkpoint is step {newest}: run `nepa-scale export {path}` first"
            )
        path = path / "export" / ("model_ema.safetensors" if ema else "model.safetensors")
    load_weights(backbone, path, head="ignore", qk_norm="fill")
    log.info("initialised from %s", path)


def backbone_flops(config: RunConfig, arch: NepaArch) -> float:
    """Training FLOPs per image under the run's convention (nepa_scale/flops.py)."""
    return train_flops_per_image(arch, config.budget.flop_convention)


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

    @staticmethod
    def val_dataset(config: RunConfig, arch: NepaArch):
        return build_dataset(config.data, "val", arch.image_size, train=False)

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
            return {}
        values = {k: v.item() for k, v in means.items() if v.numel() == 1}
        trivial = {k: values[f"val_loss_{k}"] for k in ("mean_target", "copy_last")}
        width = self.ctx.arch.dim
        ranks = {k: effective_rank_from_gram(means[f"gram_{k}"]) for k in ("features", "targets")}
        return {
            **values,
            "val_gap_closed": gap_closed(values["val_loss"], trivial),
            **{f"rankme_{k}": rank / width for k, rank in ranks.items()},
            **{f"erank_{k}": rank for k, rank in ranks.items()},
        }


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

    val_dataset = staticmethod(PretrainTask.val_dataset)

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

        means = ctx.evaluator.held_out(
            engine, lambda out, batch: {"val_acc": correct(out, batch)}, limit=None
        )
        result = {"val_acc": means["val_acc"].item() if means else None}
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

                best = ctx.run.root / "best_ema.safetensors"
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(best))
                follow_umask(best)
                self.best_file.write_text(json.dumps({"val_acc_ema": result["val_acc_ema"], "step": step}))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return result


class SegmentTask:
    """ADE20K-style semantic segmentation (docs/segmentation.md): a bidirectional backbone, four
    blocks' features -> pyramid -> UPerNet + auxiliary FCN head, cross-entropy on crops, layer-wise
    lr decay; mIoU on the val split by single-scale sliding-window (or whole-image) inference."""

    name = "segment"
    eval_each_epoch = False
    eval_at_start = False

    def __init__(self, ctx: TaskContext):
        from nepa_scale.data import check_pairs

        self.ctx = ctx
        self.eval_file = ctx.run.root / "segment_eval.json"
        synced = ctx.world.world_size > 1 and ctx.world.device.type == "cuda"
        if ctx.settings.micro_batch < 2 and not synced:
            raise ConfigError(
                "budget.micro_batch: segmentation's BatchNorm needs at least 2 images per micro-batch on "
                f"one process (or SyncBatchNorm across CUDA ranks), got {ctx.settings.micro_batch}"
            )
        check_pairs(ctx.evaluator.val_set.pairs)  # a bad val annotation now, not at the first evaluation

    @staticmethod
    def resolve_arch(config: RunConfig) -> NepaArch:
        """The zoo arch at the crop size, bidirectional (unless ``segment.causal``), with drop-path."""
        sg = config.segment
        return config.model.arch().replace(causal=sg.causal, drop_path=sg.drop_path, image_size=sg.crop)

    @staticmethod
    def flops_per_image(config: RunConfig, arch: NepaArch) -> float:
        """The backbone's under the run's convention at the crop, plus 3x the pyramid's and heads'
        forward FLOPs (counted; backward taken as twice the forward, as the conventions do)."""
        from nepa_scale.models.segmentation import feature_blocks, head_forward_flops

        sg, grid = config.segment, config.segment.crop // arch.patch_size
        aux = sg.aux_channels if sg.aux_weight > 0 else 0
        heads = head_forward_flops(arch.dim, sg.num_classes, grid, grid, sg.decoder_channels, aux)
        last = max(sg.feature_blocks or feature_blocks(arch.depth))  # later blocks never run
        return backbone_flops(config, arch.replace(depth=last)) + 3 * heads

    @staticmethod
    def new_model(config: RunConfig, arch: NepaArch, attention: str, grad_checkpointing: int = 0):
        """The run's segmenter at its initialisation (random weights; ``build_model`` loads the
        pretrained backbone)."""
        from nepa_scale.models.segmentation import NepaSegmenter

        sg = config.segment
        return NepaSegmenter(
            arch,
            sg.num_classes,
            tuple(sg.feature_blocks) if sg.feature_blocks else None,
            sg.decoder_channels,
            sg.aux_channels if sg.aux_weight > 0 else 0,
            attention=attention,
            grad_checkpointing=grad_checkpointing,
        )

    def build_model(self):
        c, sg = self.ctx.config, self.ctx.config.segment
        model = self.new_model(c, self.ctx.arch, c.model.attention, self.ctx.settings.checkpointed_blocks)
        load_pretrained(model.backbone, sg.pretrained, sg.pretrained_ema, "segment.pretrained")
        # Never used: the features are taken before the final norm and from no later block.
        model.backbone.norm.requires_grad_(False)
        model.backbone.blocks[max(model.feature_blocks) :].requires_grad_(False)
        if self.ctx.world.world_size > 1 and self.ctx.world.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN
        return model

    def optimizer_groups(self, model, peak_lr: float) -> list[dict]:
        return layer_decay_groups(
            model, peak_lr, self.ctx.config.optim.weight_decay, self.ctx.config.segment.layer_decay
        )

    @staticmethod
    def train_dataset(config: RunConfig, arch: NepaArch):
        from nepa_scale.data.segmentation import segmentation_dataset

        return segmentation_dataset(config.data, config.segment, "train", train=True)

    @staticmethod
    def val_dataset(config: RunConfig, arch: NepaArch):
        from nepa_scale.data.segmentation import segmentation_dataset

        return segmentation_dataset(config.data, config.segment, "val", train=False)

    def micro_step(
        self, engine, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from nepa_scale.eval.segmentation import segmentation_loss

        labels = labels.to(images.device)
        out = engine(images)
        decode = segmentation_loss(out.logits, labels)
        loss = decode
        if out.aux_logits is not None:
            loss = decode + self.ctx.config.segment.aux_weight * segmentation_loss(out.aux_logits, labels)
        return loss, {"loss": loss.detach(), "decode_loss": decode.detach()}

    def annotate(self, record: dict) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, engine, ema: Ema | None, step: int) -> dict:
        """mIoU over the val split (or its first ``segment.eval_limit`` images), each rank scoring
        every world_size-th image, confusion matrices summed; per-class IoU to segment_eval.json."""
        from nepa_scale.eval.segmentation import score_images, summary

        ctx, sg = self.ctx, self.ctx.config.segment
        dataset = ctx.evaluator.val_set
        count = min(len(dataset), sg.eval_limit or len(dataset))
        engine.eval()
        confusion = score_images(
            lambda x: engine(x).logits,
            dataset,
            list(range(ctx.world.rank, count, ctx.world.world_size)),
            sg.num_classes,
            sg.crop,
            ctx.arch.patch_size,
            sg.eval_mode,
            sg.eval_stride,
            ctx.world.device,
            ctx.settings.dtype,
            ctx.config.data.num_workers,
            ctx.config.data.worker_start,
        ).to(ctx.world.device)
        engine.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(confusion)
        result = summary(confusion.cpu())
        if ctx.world.is_main:
            record = {
                "step": step,
                "images": count,
                "mode": sg.eval_mode,
                "precision": ctx.settings.precision,
                **result,
            }
            self.eval_file.write_text(json.dumps(record, indent=1))
        return {"val_miou": result["miou"], "val_pixel_acc": result["pixel_acc"]}


TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask, "segment": SegmentTask}


def planned_arch_and_flops(config: RunConfig) -> tuple[NepaArch, float]:
    """The architecture a run trains and its training FLOPs per image as the trainer counts them,
    without reading data (for the planner: a fine-tune's head size is not in its convention)."""
    if config.task == "segment":
        arch = SegmentTask.resolve_arch(config)
        return arch, SegmentTask.flops_per_image(config, arch)
    arch = config.model.arch()
    return arch, backbone_flops(config, arch)
