"""Label-free diagnostics of a NEPA run: why its loss moved, measured without labels.

NEPA's targets are the model's own patch embeddings, so a lower loss can mean better predictions
or targets that became easier to predict. These diagnostics tell the two apart; they describe one
run and are never fitted across model sizes:

- **effective rank** (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular
  values of a set of embeddings; divided by the width it is comparable across sizes (0 to 1);
- **trivial predictors** on the same held-out batch as the loss: the image's mean target (the
  best single direction per image: the mean of its unit target vectors) and the current
  position's own target (copy the last embedding). A run that beats neither learned nothing the
  targets do not give away;
- **gap closed**: the share of the distance between the better trivial predictor's loss and a
  perfect prediction (-1) that the model covers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RANKME_EPS = 1e-7  # the paper's epsilon added to the normalised singular values


def effective_rank(singular_values: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """exp(-sum p log p) with p = s / |s|_1 + eps (RankMe's definition)."""
    s = singular_values.double().clamp_min(0)
    p = s / s.sum().clamp_min(1e-300) + eps
    return math.exp(-(p * p.log()).sum().item())


def effective_rank_from_gram(gram: torch.Tensor) -> float:
    """RankMe of a matrix X from X^T X (any positive scale): the singular values of X are the
    square roots of its eigenvalues. Summing X^T X over batches and ranks needs no copy of X."""
    eigenvalues = torch.linalg.eigvalsh(gram.double())
    return effective_rank(eigenvalues.clamp_min(0).sqrt())


def gram(rows: torch.Tensor) -> torch.Tensor:
    """X^T X / rows in fp64 (in fp32 the rounding of near-zero eigenvalues adds rank that is not
    there): what ``effective_rank_from_gram`` needs, averaged per row."""
    x = rows.reshape(-1, rows.shape[-1]).double()
    return x.T @ x / max(1, len(x))


def trivial_prediction_losses(target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The NEPA loss (negative cosine, shifted as the objective is: position t predicts t+1) of two
    predictors that learn nothing, on the raw target sequence ``target`` (B, 1+N, D) with [CLS]:

    - ``mean_target``: every position predicts the mean of the image's unit targets t = 1..N;
    - ``copy_last``: position t predicts its own target z_t."""
    z = F.normalize(target.detach().float(), dim=-1)
    following = z[:, 1:]
    mean = F.normalize(following.mean(dim=1, keepdim=True), dim=-1)
    return {
        "mean_target": -(following * mean).sum(-1).mean(),
        "copy_last": -(following * z[:, :-1]).sum(-1).mean(),
    }


def gap_closed(loss: float, trivial: dict[str, float]) -> float:
    """(best trivial loss - loss) / (best trivial loss + 1): 0 at the better trivial predictor, 1 at
    a perfect prediction (loss -1), below 0 when the model is worse than copying."""
    best = min(trivial.values())
    return (best - loss) / (best + 1.0) if best > -1.0 else math.nan
