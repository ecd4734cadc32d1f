"""The segmentation backbone's feature pyramid, as BEiT and MAE build it for UPerNet.

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

import torch
from torch import nn

SEGMENT_CROP = 518  # 37 x 14: the nearest multiple of the patch size above the protocol's 512

# The blocks whose outputs feed the pyramid (1-based), by depth: BEiT/MAE's choices for B (12) and
# L (24); S shares B's depth, and H's 32 blocks are taken at every quarter.
FEATURE_BLOCKS = {12: (4, 6, 8, 12), 24: (8, 12, 16, 24), 32: (8, 16, 24, 32)}


def feature_blocks(depth: int) -> tuple[int, int, int, int]:
    """The default four blocks for a model of ``depth`` blocks (every quarter if not tabled)."""
    if depth in FEATURE_BLOCKS:
        return FEATURE_BLOCKS[depth]
    if depth < 4:
        raise ValueError(f"a 4-level pyramid needs at least 4 blocks, the model has {depth}")
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
