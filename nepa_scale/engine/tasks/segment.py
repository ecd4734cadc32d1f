"""Semantic segmentation, ADE20K-style (docs/segmentation.md): a pretrained backbone's features
from four blocks -> pyramid -> UPerNet and an auxiliary FCN head; mIoU on the val split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from nepa_scale.config import RunConfig
from nepa_scale.data import check_pairs
from nepa_scale.data.segmentation import segmentation_dataset
from nepa_scale.engine.tasks.base import (
    Evaluation,
    TaskContext,
    backbone_flops,
    layer_decay_groups,
    load_pretrained,
)
from nepa_scale.errors import ConfigError
from nepa_scale.eval.segmentation import score_images, segmentation_loss, summary
from nepa_scale.models.arch import NepaArch
from nepa_scale.models.segmentation import NepaSegmenter, feature_blocks, head_forward_flops

if TYPE_CHECKING:  # type hints only
    from nepa_scale.engine.ema import Ema

SEGMENT_EVAL_FILE = "segment_eval.json"  # the newest evaluation's per-class IoU, in the run directory


class SegmentTask:
    """ADE20K-style semantic segmentation (docs/segmentation.md): a bidirectional backbone, four
    blocks' features -> pyramid -> UPerNet + auxiliary FCN head, cross-entropy on crops, layer-wise
    lr decay; mIoU on the val split by single-scale sliding-window (or whole-image) inference."""

    name = "segment"
    eval_each_epoch = False
    eval_at_start = False

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
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
        sg, grid = config.segment, config.segment.crop // arch.patch_size
        aux = sg.aux_channels if sg.aux_weight > 0 else 0
        heads = head_forward_flops(arch.dim, sg.num_classes, grid, grid, sg.decoder_channels, aux)
        last = max(sg.feature_blocks or feature_blocks(arch.depth))  # later blocks never run
        return backbone_flops(config, arch.replace(depth=last)) + 3 * heads

    @staticmethod
    def new_model(config: RunConfig, arch: NepaArch, attention: str, grad_checkpointing: int = 0):
        """The run's segmenter at its initialisation (random weights; ``build_model`` loads the
        pretrained backbone)."""
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
        return segmentation_dataset(config.data, config.segment, "train", train=True)

    @staticmethod
    def val_dataset(config: RunConfig, arch: NepaArch):
        return segmentation_dataset(config.data, config.segment, "val", train=False)

    def micro_step(
        self, engine, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    def evaluate(self, engine, ema: Ema | None, step: int) -> Evaluation:
        """mIoU over the val split (or its first ``segment.eval_limit`` images), each rank scoring
        every world_size-th image, confusion matrices summed; per-class IoU in its record (segment_eval.json)."""
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
        return Evaluation(
            {"val_miou": result["miou"], "val_pixel_acc": result["pixel_acc"]},
            record={"step": step, "images": count, "mode": sg.eval_mode, "precision": ctx.settings.precision}
            | result,
            record_file=SEGMENT_EVAL_FILE,
        )
