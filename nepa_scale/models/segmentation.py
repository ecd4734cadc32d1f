"""Semantic segmentation on a NEPA backbone: the feature pyramid and UPerNet, as BEiT and MAE build them.

A plain ViT has one token grid (stride = the patch size). Four of its blocks' outputs become a
4-level pyramid: two transposed convolutions (x4), one (x2), the grid itself (x1) and a 2x2 max-pool
(x1/2). With patch 16 those are strides 4, 8, 16 and 32. With patch 14 they are 3.5, 7, 14 and 28 px:
the decoder sees the same relative scales.

**The crop.** 512 px, the ADE20K protocol's crop, is not a multiple of 14. NEPA's 2D RoPE works on
patch-centre coordinates normalised to [-1, 1], so any grid is valid. We use 518 px, a 37 x 37 grid
and the nearest multiple of 14 above 512, as DINOv2 does for its patch-14 models, rather than pad
(padding would put never-seen blank tokens into every window).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nepa_scale.models.arch import NepaArch
from nepa_scale.models.vit import NEPA

SEGMENT_CROP = 518  # 37 x 14: the nearest multiple of the patch size above the protocol's 512

# The blocks whose outputs feed the pyramid (1-based), by depth: BEiT/MAE's choices for B (12) and
# L (24); S shares B's depth, and H's 32 blocks are taken at every quarter.
FEATURE_BLOCKS = {12: (4, 6, 8, 12), 24: (8, 12, 16, 24), 32: (8, 16, 24, 32)}


def feature_blocks(depth: int) -> tuple[int, int, int, int]:
    """The default four blocks for a model of ``depth`` blocks (every quarter if not tabled)."""
    if depth in FEATURE_BLOCKS:
        return FEATURE_BLOCKS[depth]
    if depth < 4:  # a miniature model: some blocks feed two levels
        return tuple(math.ceil(depth * q / 4) for q in (1, 2, 3, 4))
    return tuple(depth * q // 4 for q in (1, 2, 3, 4))


class FeaturePyramid(nn.Module):
    """Four (B, dim, H, W) token grids -> (B, dim, 4H, 4W), (2H, 2W), (H, W), (H/2, W/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.same = nn.Identity()
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(grids) != 4:
            raise ValueError(f"the pyramid takes 4 block outputs, got {len(grids)}")
        return [op(grid) for op, grid in zip((self.up4, self.up2, self.same, self.down2), grids, strict=True)]


class ConvBnRelu(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )


class UPerHead(nn.Module):
    """UPerNet's decoder as mmsegmentation's ``UPerHead`` (what BEiT's and MAE's ADE20K numbers use):
    a pyramid pooling module (scales 1, 2, 3, 6) on the coarsest level, 1x1 lateral convolutions and
    a top-down path over the others, a 3x3 convolution per level, then the four levels upsampled to
    the finest, concatenated and fused by a 3x3 convolution, dropout 0.1 and a 1x1 classifier.

    Written here rather than taken from segmentation-models-pytorch: its UPerNet decoder puts a
    LayerNorm on every input level, which mmsegmentation's head does not have, and expects six
    encoder levels (strides 1 to 32) where a ViT pyramid has four."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 512, pool_scales=(1, 2, 3, 6)):
        """``channels``: 512 is mmsegmentation's default; BEiT's ViT-B UPerNet config uses 768."""
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBnRelu(in_dim, channels, 1))
            for scale in pool_scales
        )
        self.psp_bottleneck = ConvBnRelu(in_dim + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvBnRelu(in_dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvBnRelu(channels, channels, 3) for _ in range(3))
        self.fuse = ConvBnRelu(4 * channels, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        coarsest = levels[3]
        pooled = [
            nn.functional.interpolate(
                pool(coarsest), size=coarsest.shape[2:], mode="bilinear", align_corners=False
            )
            for pool in self.pools
        ]
        tops = [lateral(level) for lateral, level in zip(self.laterals, levels[:3], strict=True)]
        tops.append(self.psp_bottleneck(torch.cat([coarsest, *pooled], dim=1)))
        for i in (2, 1, 0):  # top-down: each level adds the upsampled coarser one
            tops[i] = tops[i] + nn.functional.interpolate(
                tops[i + 1], size=tops[i].shape[2:], mode="bilinear", align_corners=False
            )
        outs = [conv(top) for conv, top in zip(self.fpn_convs, tops[:3], strict=True)] + [tops[3]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [
            nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)
            for out in outs[1:]
        ]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


class FCNHead(nn.Module):
    """The auxiliary head on the third level (mmsegmentation's ``FCNHead``, one 3x3 convolution):
    a second loss (weight 0.4 in the BEiT/MAE configs) that trains the middle of the backbone."""

    def __init__(self, in_dim: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.conv = ConvBnRelu(in_dim, channels, 3)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.conv(levels[2]))


@functools.lru_cache(maxsize=32)
def head_forward_flops(
    dim: int, num_classes: int, rows: int, cols: int, decoder_channels: int, aux_channels: int
) -> float:
    """Forward FLOPs per image of the pyramid, UPerNet and the auxiliary head on a rows x cols token
    grid, counted by torch's FlopCounterMode on meta tensors (no memory, no compute). At ADE20K's
    crop they are most of a segmentation step: 1,335 GFLOP against the B/14 backbone's 303."""

    with torch.device("meta"):
        pyramid, decoder = FeaturePyramid(dim), UPerHead(dim, num_classes, decoder_channels)
        aux = FCNHead(dim, num_classes, aux_channels) if aux_channels else None
        grids = [torch.zeros(2, dim, rows, cols) for _ in range(4)]  # 2: BatchNorm trains on > 1 value
        counter = FlopCounterMode(display=False)
        with counter:
            levels = pyramid(grids)
            decoder(levels)
            if aux is not None:
                aux(levels)
    return counter.get_total_flops() / 2


class SegmentOutput(NamedTuple):
    logits: torch.Tensor  # (B, classes, H/4 x patch/4 ...): the decoder's, at the finest level
    aux_logits: torch.Tensor | None  # the auxiliary head's (training only)


class NepaSegmenter(nn.Module):
    """A bidirectional NEPA backbone -> four blocks' patch grids -> pyramid -> UPerNet (+ FCN aux).

    The block outputs are taken as they leave the block, before the final LayerNorm (as BEiT's
    and MAE's segmentation backbones take them); the [CLS] token is dropped. The logits come out at
    a quarter of the patch size's stride and are upsampled to the labels by the loss and the
    evaluation, as mmsegmentation does."""

    def __init__(
        self,
        arch: NepaArch,
        num_classes: int,
        blocks: tuple[int, ...] | None = None,
        decoder_channels: int = 512,
        aux_channels: int = 256,
        attention: str = "auto",
        grad_checkpointing: bool | int = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.feature_blocks = tuple(blocks) if blocks else feature_blocks(arch.depth)
        self.backbone = NEPA(arch.replace(num_classes=0), attention, grad_checkpointing)
        self.pyramid = FeaturePyramid(arch.dim)
        self.decode_head = UPerHead(arch.dim, num_classes, decoder_channels)
        self.aux_head = FCNHead(arch.dim, num_classes, aux_channels) if aux_channels else None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.blocks

    def set_attention(self, **kwargs) -> None:
        self.backbone.set_attention(**kwargs)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-decay groups as mmseg's LayerDecayOptimizerConstructor for BEiT: the stem
        decays most, block i as layer i + 1, the pyramid and heads (unmatched) take the full lr."""
        return {
            "stem": r"^backbone\.(?:cls_token|patch_embed)",
            "blocks": [(r"^backbone\.blocks\.(\d+)", None), (r"^backbone\.norm", (99999,))],
        }

    def forward(self, images: torch.Tensor) -> SegmentOutput:
        levels = self.pyramid(self.backbone.block_grids(images, self.feature_blocks))
        aux = self.aux_head(levels) if self.training and self.aux_head is not None else None
        return SegmentOutput(self.decode_head(levels), aux)
