"""The next-embedding prediction loss: position t predicts the embedding at t+1.

L = -mean_{b,t} < z_hat[b,t] / |z_hat[b,t]| , sg(z[b,t+1]) / |z[b,t+1]| >, in fp32.
With [CLS] prepended, position 0 ([CLS]) predicts the first patch and the last patch predicts
nothing, so an image with N patches contributes N predictions. The loss lies in [-1, 1];
a run whose loss reaches -1 while the targets lose their spread has collapsed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class NepaLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    target_spread: torch.Tensor  # scalar, no grad: 1 - mean pairwise cosine of the targets in an image


def target_spread(target: torch.Tensor) -> torch.Tensor:
    """1 - mean pairwise cosine similarity between the target embeddings of one image, averaged.

    0 when every position embeds to the same direction (collapse), about 1 for unrelated
    directions. Computed without materialising the T x T matrix: for unit vectors u_t,
    sum_{s != t} <u_s, u_t> = |sum_t u_t|^2 - T.
    """
    with torch.no_grad():
        unit = F.normalize(target.float(), dim=-1)
        t = unit.shape[1]
        pair_sum = unit.sum(dim=1).pow(2).sum(dim=-1) - t
        return 1.0 - (pair_sum / (t * (t - 1))).mean()


def next_embedding_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    stop_gradient: bool = True,
    shift: bool = True,
) -> NepaLoss:
    """Negative cosine between z_hat[:, t] and sg(z[:, t+1]), L2-normalised, in fp32.

    ``stop_gradient=False`` and ``shift=False`` exist only for the paper's ablations (the first
    collapses, the second learns nothing useful).
    """
    if stop_gradient:
        target = target.detach()
    if shift:
        prediction, target = prediction[:, :-1], target[:, 1:]
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.float(), dim=-1)
    loss = -(p * z).sum(dim=-1).mean()
    return NepaLoss(loss=loss, target_spread=target_spread(target))
