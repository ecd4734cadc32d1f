"""Probes on frozen features: k-nearest neighbours (cosine) and a linear probe (logistic regression).

Features are the mean of the patch tokens of the final-LayerNorm output, with the attention
causal or bidirectional as asked (the same pooling as the classification head, before fc_norm).
Fitting uses scikit-learn; feature extraction is plain inference and works on any module exposing
``forward_features`` (a NEPA model, or a DeepSpeed engine's ``module``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from nepa_scale.data import collate, to_model_input
from nepa_scale.errors import DataError


@dataclass
class ProbeResult:
    linear_acc: float
    knn_acc: float
    k: int
    n_train: int
    n_test: int
    causal: bool

    def metrics(self, prefix: str = "probe_") -> dict[str, float]:
        """Keys for metrics.jsonl: accuracies and errors (the analysis fits errors like losses)."""
        return {
            f"{prefix}linear_acc": self.linear_acc,
            f"{prefix}linear_error": 1.0 - self.linear_acc,
            f"{prefix}knn_acc": self.knn_acc,
            f"{prefix}knn_error": 1.0 - self.knn_acc,
        }


@torch.no_grad()
def extract_features(
    model,
    dataset,
    *,
    causal: bool,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled final-LN features (fp32 numpy) and labels for (the first ``limit`` items of) a dataset."""
    backbone = getattr(model, "module", model)
    was_training, was_causal = backbone.training, backbone.causal
    backbone.eval()
    backbone.set_attention(causal=causal)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    # (index, seed) items: evaluation transforms are deterministic, the seed is unused.
    loader = DataLoader(
        dataset, sampler=[(i, i) for i in range(count)], batch_size=batch_size, collate_fn=collate
    )
    # A DeepSpeed engine is called whole (ZeRO-3 gathers parameters in its hooks); a bare model
    # through forward_features (a classifier's forward would return logits).
    forward = model if backbone is not model else backbone.forward_features
    feats, labels = [], []
    try:
        for batch in loader:
            tokens = forward(to_model_input(batch.images, device, dtype)).prediction
            feats.append(backbone.pool(tokens).float().cpu())
            labels.append(batch.labels)
    finally:
        backbone.set_attention(causal=was_causal)
        backbone.train(was_training)
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def linear_probe(train_x, train_y, test_x, test_y, c: float = 1.0, max_iter: int = 2000) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def knn_probe(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    clf = KNeighborsClassifier(n_neighbors=min(k, len(train_x)), metric="cosine", weights="distance")
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def run_probes(
    model,
    train_set,
    test_set,
    *,
    causal: bool = True,
    k: int = 20,
    c: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    limit: int | None = None,
) -> ProbeResult:
    train_x, train_y = extract_features(
        model, train_set, causal=causal, device=device, dtype=dtype, limit=limit
    )
    test_x, test_y = extract_features(model, test_set, causal=causal, device=device, dtype=dtype, limit=limit)
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise DataError(
            f"probe: the {len(train_y)} training images have a single label ({classes[0]}): "
            "a probe needs at least two classes"
        )
    return ProbeResult(
        linear_acc=linear_probe(train_x, train_y, test_x, test_y, c=c),
        knn_acc=knn_probe(train_x, train_y, test_x, test_y, k=k),
        k=k,
        n_train=len(train_y),
        n_test=len(test_y),
        causal=causal,
    )


def probe_run(
    run_dir: str | Path,
    *,
    weights: str = "online",
    causal: bool = True,
    k: int = 20,
    limit: int | None = None,
    data_overrides: list[str] = (),
    reuse: bool = False,
) -> tuple[dict, Path]:
    """Probe a run's newest committed checkpoint: its ``online`` weights, its ``ema`` weights, or the
    same architecture at the run's initialisation (``random_init``, the baseline a probe is read
    against). The record is written to RUN_DIR/probes/ and returned with its path; ``reuse``: a record
    already there for the same checkpoint (and no data overrides) is returned as it is."""
    from nepa_scale.config import apply_overrides, config_from_dict
    from nepa_scale.data import build_dataset
    from nepa_scale.engine.checkpoint import EMA_FILE
    from nepa_scale.engine.export import fp32_state_dict, newest_verified
    from nepa_scale.errors import CheckpointError
    from nepa_scale.models.vit import NEPA
    from nepa_scale.rundir import RunDir

    if weights not in ("online", "ema", "random_init"):
        raise ValueError(f"weights: choose online, ema or random_init, got '{weights}'")
    run = RunDir(run_dir)
    recorded = run.record().run_config().to_dict()
    config = config_from_dict(
        apply_overrides(recorded, [f"data.{item}" for item in data_overrides]), check_paths=False
    )
    latest = newest_verified(run)
    name = "random_init" if weights == "random_init" else f"{latest.tag}{'_ema' if weights == 'ema' else ''}"
    out = run.root / "probes" / f"{name}{'' if causal else '_bidir'}.json"
    if reuse and not data_overrides and out.is_file():
        record = json.loads(out.read_text())
        if record.get("k") == k and record.get("limit") == limit:
            return record, out
    if weights == "random_init":
        torch.manual_seed(config.seed)
        state = NEPA(config.model.arch()).state_dict()
    elif weights == "ema":
        if not (latest.path / EMA_FILE).is_file():
            raise CheckpointError(f"{latest.path}: no {EMA_FILE} (the run kept no EMA)")
        state = torch.load(latest.path / EMA_FILE, map_location="cpu", weights_only=True)
    else:
        state = fp32_state_dict(latest)
    arch = config.model.arch()
    model = NEPA(arch, attention="sdpa")
    model.load_state_dict(state)
    train_set = build_dataset(config.data, "train", arch.image_size, train=False)
    val_set = build_dataset(config.data, "val", arch.image_size, train=False)
    result = run_probes(model, train_set, val_set, causal=causal, k=k, limit=limit)
    step = 0 if weights == "random_init" else latest.step
    record = {"step": step, "weights": weights, "limit": limit, **result.__dict__}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record, out
