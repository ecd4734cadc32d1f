"""Probes on frozen features: DINO's weighted kNN and a linear probe, in torch on the run's device.

Features are the mean of the patch tokens of the final-LayerNorm output, with the attention causal
or bidirectional as asked (the same pooling as the classification head, before fc_norm). They are
extracted sharded over the ranks and gathered once (``extract_features``); the probes then run on
cached features, so nothing scales with one host's CPU. scikit-learn is only the reference the
tests compare with.

- kNN (Caron et al. 2021, section 3.2): cosine similarity of L2-normalised features, the k = 20
  nearest training images vote for their class with weight exp(similarity / 0.07).
- Linear probe: multinomial logistic regression on standardised features, full-batch L-BFGS, its
  weight decay chosen from ``PROBE_WEIGHT_DECAYS`` on a fixed held-out fifth of the training
  features, then refitted on all of them.

The images a probe sees are a fixed, seeded, class-balanced subset of each split
(``class_balanced_subset``): the same for every run of a study, recorded in run.json.

With ``logging.probe_folds`` = k, both probes are scored by stratified k-fold cross-validation over
the two subsets pooled (``stratified_folds``): every labelled image the probe may use is scored once,
by a probe trained on the other k - 1 folds (its weight decay chosen once, on a held-out fifth of
the first fold's training images: ``cross_validated_probe``). Why pool the val subset in: a small
val split (the digits' 229 images) makes the error coarse (one image = 0.44 points) and noisy from
one evaluation point to the next; pooled, every image of the ~2,000 counts. The probe's labels stay
apart from pretraining's objective (NEPA never sees a label), so scoring train-split images is not a
leak. The folds are drawn from ``logging.probe_subset_seed`` alone and their digest is recorded in
run.json beside the subsets: every run of a study and every resume scores the same folds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from nepa_scale.data import Skipped, to_model_input, worker_context
from nepa_scale.errors import DataError

KNN_K = 20
KNN_TEMPERATURE = 0.07
# The linear probe's L2 penalty on the mean cross-entropy, ``wd / 2 * |W|^2``, over standardised
# features (scikit-learn's C is 1 / (wd * images)); one grid for every run, so probes compare.
PROBE_WEIGHT_DECAYS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # fitted in this order, each from the previous solution
PROBE_HOLDOUT = 0.2  # share of the training subset that chooses the weight decay


# ----------------------------------------------------------------------------- which images


def dataset_labels(dataset) -> list[int]:
    """Every item's label without decoding an image (the digits, an image folder, synthetic data)."""
    if hasattr(dataset, "labels"):
        return list(dataset.labels)
    if hasattr(dataset, "samples"):
        return [label for _, label in dataset.samples]
    if hasattr(dataset, "num_classes"):  # synthetic: index mod classes
        return [i % dataset.num_classes for i in range(len(dataset))]
    raise DataError(f"probe: {type(dataset).__name__} has no labels to probe")


def class_balanced_subset(labels, per_class: int | None, seed: int) -> list[int]:
    """Up to ``per_class`` items of each class, drawn without replacement by a generator seeded with
    ``seed`` alone (not the run's seed: every run of a study sees the same images), in index order.
    ``per_class`` None: every item."""
    labels = np.asarray(labels)
    if per_class is None:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen += rng.permutation(members)[:per_class].tolist()
    return sorted(chosen)


def subset_digest(indices: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(map(int, indices))).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProbeSubset:
    """The images of one split a probe uses: what run.json records of them."""

    split: str
    indices: list[int]
    classes: int

    def record(self) -> dict:
        return {"images": len(self.indices), "classes": self.classes, "digest": subset_digest(self.indices)}


def probe_subset(dataset, split: str, per_class: int | None, seed: int) -> ProbeSubset:
    labels = dataset_labels(dataset)
    indices = class_balanced_subset(labels, per_class, seed)
    return ProbeSubset(split, indices, len({labels[i] for i in indices}))


def check_probe_subsets(train: ProbeSubset, val: ProbeSubset, where: str = "probe") -> None:
    """A probe needs two classes in its training images and at least one val image."""
    if train.classes < 2:
        raise DataError(
            f"{where}: the {len(train.indices)} training images of the probe have a single label: a probe "
            "needs at least two classes (turn logging.probe_every off for unlabelled data)"
        )
    if not val.indices:
        raise DataError(f"{where}: the val split has no image to probe on")


def stratified_folds(labels, k: int, seed: int) -> np.ndarray:
    """A fold in 0..k-1 for each item: each class's items in an order drawn from ``seed`` alone, dealt
    round the folds, continuing where the previous class stopped (so fold sizes differ by at most one
    and each fold holds every class in proportion)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, k])  # its own stream: not the subset's draw
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (offset + np.arange(len(members))) % k
        offset += len(members)
    return folds


def folds_digest(folds) -> str:
    return hashlib.sha256(json.dumps(np.asarray(folds).tolist()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProbeFolds:
    """The k folds over the pooled subsets (train subset, then val subset, in their index order)."""

    k: int
    folds: np.ndarray

    def record(self) -> dict:
        return {"k": self.k, "digest": folds_digest(self.folds)}


def probe_folds(
    train_set,
    val_set,
    train: ProbeSubset,
    val: ProbeSubset,
    k: int,
    seed: int,
    where: str = "logging.probe_folds",
) -> ProbeFolds:
    """Stratified folds over both subsets' images. Refused when a class has fewer images than folds
    (a fold without that class would score it from no example of it, unevenly across folds)."""
    train_labels, val_labels = dataset_labels(train_set), dataset_labels(val_set)
    labels = np.array([train_labels[i] for i in train.indices] + [val_labels[i] for i in val.indices])
    classes, counts = np.unique(labels, return_counts=True)
    if counts.min() < k:
        smallest = int(classes[counts.argmin()])
        raise DataError(
            f"{where}: {k} folds need at least {k} probe images of every class, but class {smallest} has "
            f"{int(counts.min())} (train and val subsets together): use fewer folds or more images per class"
        )
    return ProbeFolds(k, stratified_folds(labels, k, seed))


# ----------------------------------------------------------------------------- features


def _probe_collate(image_size: int, channels: int = 3):
    """Stack a probe batch keeping every position: an unreadable image becomes zeros and is marked,
    so features stay aligned with the subset's labels (its row is dropped after the gather)."""

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        good = [item for item in items if not isinstance(item, Skipped)]
        blank = (
            torch.zeros_like(good[0][0])
            if good
            else torch.zeros(channels, image_size, image_size, dtype=torch.uint8)
        )
        images = torch.stack([blank if isinstance(item, Skipped) else item[0] for item in items])
        return images, torch.tensor([not isinstance(item, Skipped) for item in items])

    return collate


def _gather_rows(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's equally long ``local`` rows, interleaved back into the order they were dealt in
    (rank r held items r, r + world, r + 2 world, ...)."""
    if world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *local.shape[1:])


@torch.no_grad()
def extract_features(
    model,
    dataset,
    indices: list[int],
    *,
    causal: bool,
    batch_size: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    worker_start: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled final-LN features (fp32, on ``device``) of ``dataset[indices]`` in that order, and
    a mask of the readable ones. Each rank extracts every ``world_size``-th image (the same number
    of batches on every rank: ZeRO-3's forward is a collective) and one all-gather puts them back in
    order on every rank. ``model``: a NEPA, or a DeepSpeed engine (called whole, so that ZeRO-3
    gathers its parameters)."""
    backbone = getattr(model, "module", model)
    was_training, was_causal = backbone.training, backbone.causal
    backbone.eval()
    backbone.set_attention(causal=causal)
    per_rank = max(1, math.ceil(len(indices) / world_size))
    mine = list(indices[rank::world_size]) or [indices[0]]
    mine += [mine[-1]] * (per_rank - len(mine))  # padding, cut after the gather
    loader = DataLoader(
        dataset,
        sampler=[(i, i) for i in mine],  # (index, seed): the eval transform is deterministic
        batch_size=batch_size,
        collate_fn=_probe_collate(backbone.arch.image_size, backbone.arch.in_chans),
        num_workers=num_workers,
        multiprocessing_context=worker_context(worker_start, num_workers),
    )
    forward = model if backbone is not model else backbone.forward_features
    feats, readable = [], []
    try:
        for images, ok in loader:
            tokens = forward(to_model_input(images, device, dtype)).prediction
            feats.append(backbone.pool(tokens).float())
            readable.append(ok.to(device))
    finally:
        backbone.set_attention(causal=was_causal)
        backbone.train(was_training)
    features = _gather_rows(torch.cat(feats), world_size)[: len(indices)]
    mask = _gather_rows(torch.cat(readable), world_size)[: len(indices)]
    return features, mask


# ----------------------------------------------------------------------------- kNN


def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: each of the ``k`` most cosine-similar training features votes for its
    class with weight exp(similarity / temperature); the class with the most weight wins."""
    train = F.normalize(train_x.float(), dim=1)
    classes = int(train_y.max()) + 1
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test_x), chunk):
        sim = F.normalize(test_x[start : start + chunk].float(), dim=1) @ train.T
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


# ----------------------------------------------------------------------------- linear probe


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    weight_decay: float,
    max_iter: int = 300,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean cross-entropy + weight_decay / 2 * |W|^2 by full-batch L-BFGS, from
    zeros or from ``start`` (a solution at a larger weight decay: the path converges in fewer steps)."""
    if start is None:
        start = torch.zeros(classes, x.shape[1], device=x.device), torch.zeros(classes, device=x.device)
    weight, bias = start[0].clone(), start[1].clone()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    rows = torch.arange(len(y), device=x.device)

    def closure() -> torch.Tensor:
        # The gradient by hand (softmax - one-hot): a third of autograd's cost per evaluation.
        logits = x @ weight.T + bias
        log_p = logits.log_softmax(dim=1)
        loss = -log_p[rows, y].mean() + 0.5 * weight_decay * weight.pow(2).sum()
        residual = log_p.exp()
        residual[rows, y] -= 1
        residual /= len(y)
        weight.grad = residual.T @ x + weight_decay * weight
        bias.grad = residual.sum(dim=0)
        return loss

    optimizer.step(closure)
    return weight, bias


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale by the training features' mean and std (scikit-learn's StandardScaler: a constant
    feature keeps scale 1)."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) index tensors: ``fraction`` of each class held out, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    held = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held += members[: int(round(fraction * len(members)))].tolist()
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    device = labels.device
    return torch.from_numpy(np.flatnonzero(~mask)).to(device), torch.from_numpy(np.flatnonzero(mask)).to(
        device
    )


@dataclass
class LinearProbe:
    accuracy: float
    nll: float  # mean cross-entropy on the test features: a continuous companion of the error
    weight_decay: float  # the grid's choice
    holdout_accuracy: float  # of the chosen weight decay, on the held-out part of the training features


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS,
    seed: int = 0,
) -> LinearProbe:
    """Choose the weight decay on a held-out fifth of the training features (best accuracy, then
    lowest cross-entropy), refit on all of them, score the test features."""
    classes = int(max(train_y.max(), test_y.max())) + 1
    fit_idx, held_idx = stratified_holdout(train_y, PROBE_HOLDOUT, seed)
    best = None
    if len(weight_decays) > 1 and len(held_idx):
        fit_x, held_x = _standardise(train_x[fit_idx], train_x[held_idx])
        solution = None
        for wd in weight_decays:
            solution = w, b = fit_logistic(fit_x, train_y[fit_idx], classes, wd, start=solution)
            logits = held_x @ w.T + b
            score = (
                (logits.argmax(1) == train_y[held_idx]).float().mean().item(),
                -F.cross_entropy(logits, train_y[held_idx]).item(),
            )
            if best is None or score > best[0]:
                best = (score, wd)
    chosen = best[1] if best else weight_decays[0]
    tr, te = _standardise(train_x, test_x)
    w, b = fit_logistic(tr, train_y, classes, chosen)
    logits = te @ w.T + b
    return LinearProbe(
        accuracy=(logits.argmax(1) == test_y).float().mean().item(),
        nll=F.cross_entropy(logits, test_y).item(),
        weight_decay=chosen,
        holdout_accuracy=best[0][0] if best else math.nan,
    )


# ----------------------------------------------------------------------------- both


@dataclass
class ProbeResult:
    linear_acc: float
    knn_acc: float
    linear_nll: float
    linear_wd: float
    k: int
    n_train: int  # cross-validated: every image of the pool (each one trains k - 1 of the k probes)
    n_test: int  # cross-validated: every image of the pool (each one is scored once)
    causal: bool
    folds: int | None = None  # k of the k-fold cross-validation; None: trained on train, scored on val

    def metrics(self, prefix: str = "probe_") -> dict[str, float]:
        """Keys for metrics.jsonl: accuracies and errors (the analysis fits errors like losses)."""
        return {
            f"{prefix}linear_acc": self.linear_acc,
            f"{prefix}linear_error": 1.0 - self.linear_acc,
            f"{prefix}linear_nll": self.linear_nll,
            f"{prefix}linear_wd": self.linear_wd,
            f"{prefix}knn_acc": self.knn_acc,
            f"{prefix}knn_error": 1.0 - self.knn_acc,
            f"{prefix}train_images": self.n_train,
            f"{prefix}val_images": self.n_test,
            **({f"{prefix}folds": self.folds} if self.folds else {}),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def probe_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    k: int = KNN_K,
    causal: bool = True,
    seed: int = 0,
) -> ProbeResult:
    """kNN and the linear probe on features already extracted (any device)."""
    if len(torch.unique(train_y)) < 2:
        raise DataError(
            f"probe: the {len(train_y)} training images have a single label ({int(train_y[0])}): "
            "a probe needs at least two classes"
        )
    linear = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
    knn = (knn_predict(train_x, train_y, test_x, k) == test_y).float().mean().item()
    return ProbeResult(
        linear_acc=linear.accuracy,
        knn_acc=knn,
        linear_nll=linear.nll,
        linear_wd=linear.weight_decay,
        k=k,
        n_train=len(train_y),
        n_test=len(test_y),
        causal=causal,
    )


def cross_validated_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    folds: torch.Tensor,
    *,
    k: int = KNN_K,
    causal: bool = True,
    seed: int = 0,
    weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS,
) -> ProbeResult:
    """kNN and the linear probe scored by cross-validation: for each fold, both are trained on the
    other folds (standardised by their statistics) and score the fold's images; accuracy and
    cross-entropy are the means over every image.

    The weight decay is chosen once, as ``linear_probe`` chooses it, for the first fold (on a held-out
    fifth of its training images: never on the images it scores), and the other folds fit that one,
    each from the previous fold's solution. Choosing it afresh in every fold would cost k paths of
    L-BFGS fits (5x the probe's time on the demo, where the probe is a large share of the run); the
    folds differ by a fifth of their images, so their choices would rarely differ."""
    if len(torch.unique(y)) < 2:
        raise DataError(
            f"probe: the {len(y)} images have a single label ({int(y[0])}): a probe needs two classes"
        )
    n_folds = int(folds.max()) + 1
    classes = int(y.max()) + 1
    correct = knn_correct = nll = 0.0
    chosen, solution = None, None
    for fold in range(n_folds):
        test = folds == fold
        train = ~test
        if not test.any():
            continue
        if chosen is None:
            chosen = linear_probe(
                x[train], y[train], x[test], y[test], weight_decays=weight_decays, seed=seed
            ).weight_decay
        tr, te = _standardise(x[train], x[test])
        solution = w, b = fit_logistic(tr, y[train], classes, chosen, start=solution)
        logits = te @ w.T + b
        correct += (logits.argmax(1) == y[test]).float().sum().item()
        nll += F.cross_entropy(logits, y[test], reduction="sum").item()
        knn_correct += (knn_predict(x[train], y[train], x[test], k) == y[test]).float().sum().item()
    total = len(y)
    return ProbeResult(
        linear_acc=correct / total,
        knn_acc=knn_correct / total,
        linear_nll=nll / total,
        linear_wd=chosen,
        k=k,
        n_train=total,
        n_test=total,
        causal=causal,
        folds=n_folds,
    )


def _subset_features(model, dataset, subset: ProbeSubset, **extract) -> tuple:
    """(features, labels, readable mask) of a subset's images, extracted as ``extract_features`` does."""
    feats, ok = extract_features(model, dataset, subset.indices, **extract)
    labels = torch.tensor(dataset_labels(dataset), device=feats.device)[
        torch.tensor(subset.indices, device=feats.device)
    ]
    return feats, labels, ok


def probe_datasets(model, train_set, val_set, train: ProbeSubset, val: ProbeSubset, **extract) -> tuple:
    """(train features, train labels, val features, val labels) of the readable images of the
    subsets, extracted as ``extract_features`` does (a collective when sharded)."""
    out = []
    for dataset, subset in ((train_set, train), (val_set, val)):
        feats, labels, ok = _subset_features(model, dataset, subset, **extract)
        out += [feats[ok], labels[ok]]
    return tuple(out)


def probe_pooled(
    model, train_set, val_set, train: ProbeSubset, val: ProbeSubset, folds: ProbeFolds, **extract
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, fold of each) of the readable images of both subsets pooled, in the order
    the folds were drawn in (an unreadable image leaves its fold one image short)."""
    parts = [
        _subset_features(model, dataset, subset, **extract)
        for dataset, subset in ((train_set, train), (val_set, val))
    ]
    feats, labels, ok = (torch.cat(column) for column in zip(*parts, strict=True))
    fold = torch.from_numpy(folds.folds).to(ok.device)
    return feats[ok], labels[ok], fold[ok]
