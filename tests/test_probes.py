"""Probes and diagnostics: the torch kNN and linear probe against scikit-learn on the same features,
features extracted over two gloo ranks against one process, RankMe against numpy's SVD, the trivial
predictors against a hand computation; on the digits they run in training and from a checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, env, free_port, metrics, photo_folder, run_and_signal, run_train

from nepa_scale.data import DigitsDataset, build_transform
from nepa_scale.data.datasets import AugmentSpec
from nepa_scale.eval.diagnostics import (
    effective_rank,
    effective_rank_from_gram,
    gap_closed,
    gram,
    trivial_prediction_losses,
)
from nepa_scale.eval.probes import (
    KNN_TEMPERATURE,
    class_balanced_subset,
    cross_validated_probe,
    extract_features,
    knn_predict,
    linear_probe,
    probe_features,
    stratified_folds,
)
from nepa_scale.models import NEPA
from nepa_scale.models.zoo import get_arch

ARCH = dict(dim=48, depth=2, num_heads=2)


def digits(split: str) -> DigitsDataset:
    spec = AugmentSpec(16, (0.35, 1.0), 0.0, "bicubic", 1.0)
    return DigitsDataset(split, 16, build_transform(spec, train=False))


def untrained_model(seed: int = 0) -> NEPA:
    torch.manual_seed(seed)
    return NEPA(get_arch("nepa_tiny", **ARCH), attention="sdpa")


@pytest.fixture(scope="module")
def digit_features() -> tuple[torch.Tensor, ...]:
    """Pooled features of an untrained NEPA on the digits (train and val): real, imperfect features."""
    model, out = untrained_model(), []
    for split in ("train", "val"):
        dataset = digits(split)
        feats, ok = extract_features(model, dataset, list(range(len(dataset))), causal=True, batch_size=256)
        assert ok.all()
        out += [feats, torch.tensor(dataset.labels)]
    return tuple(out)


def test_probes_separate_separable_features_and_find_nothing_in_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 32)) * 6  # five well-separated classes in 32 dimensions
    labels = rng.integers(0, 5, 1000)
    feats = torch.tensor(centres[labels] + rng.normal(0, 1, (1000, 32)), dtype=torch.float32)
    y = torch.tensor(labels)
    result = probe_features(feats[:800], y[:800], feats[800:], y[800:], k=10)
    assert result.linear_acc >= 0.99 and result.knn_acc >= 0.99
    shuffled = y[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    chance = probe_features(feats[:800], shuffled[:800], feats[800:], shuffled[800:], k=10)
    assert chance.linear_acc < 0.4 and chance.knn_acc < 0.4


def test_torch_knn_equals_scikit_learn_weighted_knn_on_digits(digit_features):
    from sklearn.neighbors import KNeighborsClassifier

    train_x, train_y, val_x, val_y = digit_features
    ours = knn_predict(train_x, train_y, val_x, k=20)
    # DINO's vote: weight exp(cosine similarity / T); scikit-learn's cosine distance is 1 - similarity.
    reference = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", weights=lambda d: np.exp((1 - d) / KNN_TEMPERATURE)
    ).fit(train_x.numpy(), train_y.numpy())
    theirs = reference.predict(val_x.numpy())
    assert (ours.numpy() == theirs).mean() >= 0.99  # a tie in similarity may order two neighbours differently
    assert int((ours == val_y).sum()) == int((theirs == val_y.numpy()).sum())  # the same accuracy


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_torch_linear_probe_is_within_a_point_of_scikit_learn(digit_features, weight_decay):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, val_x, val_y = digit_features
    ours = linear_probe(train_x, train_y, val_x, val_y, weight_decays=(weight_decay,))
    # The same objective: scikit-learn minimises |W|^2 / 2 + C * sum CE, ours mean CE + wd / 2 |W|^2.
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=1 / (weight_decay * len(train_y)), max_iter=5000)
    ).fit(train_x.numpy(), train_y.numpy())
    theirs = reference.score(val_x.numpy(), val_y.numpy())
    assert abs(ours.accuracy - theirs) <= 0.01, (ours.accuracy, theirs)
    assert ours.weight_decay == weight_decay


def test_the_probe_chooses_its_weight_decay_on_held_out_training_features(digit_features):
    train_x, train_y, val_x, val_y = digit_features
    result = linear_probe(train_x, train_y, val_x, val_y)
    assert result.weight_decay in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1) and 0.3 < result.holdout_accuracy <= 1
    assert math.isfinite(result.nll) and result.nll > 0
    again = linear_probe(train_x, train_y, val_x, val_y)
    assert again == result  # deterministic: the same numbers for the same features


def test_class_balanced_subsets_are_fixed_balanced_and_independent_of_the_run():
    labels = DigitsDataset("train", 16, None).labels
    subset = class_balanced_subset(labels, 20, seed=0)
    assert len(subset) == 200 and subset == sorted(subset)
    assert np.bincount(np.asarray(labels)[subset]).tolist() == [20] * 10
    assert subset == class_balanced_subset(labels, 20, seed=0)
    assert subset != class_balanced_subset(labels, 20, seed=1)
    assert class_balanced_subset(labels, None, seed=0) == list(range(len(labels)))
    assert len(class_balanced_subset(labels, 10_000, seed=0)) == len(labels)  # a class smaller than asked


def _extract_on_rank(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    dataset = digits("val")
    indices = class_balanced_subset(dataset.labels, 7, seed=3)  # 70 images: not a multiple of the world
    feats, ok = extract_features(
        untrained_model(), dataset, indices, causal=True, batch_size=8, rank=rank, world_size=world_size
    )
    if rank == 0:
        torch.save({"feats": feats, "ok": ok, "indices": indices}, out)
    dist.destroy_process_group()


def test_features_extracted_over_two_gloo_ranks_equal_one_process_in_order(tmp_path):
    out = tmp_path / "two.pt"
    torch.multiprocessing.spawn(_extract_on_rank, args=(2, free_port(), str(out)), nprocs=2)
    two = torch.load(out)
    dataset = digits("val")
    one, ok = extract_features(untrained_model(), dataset, two["indices"], causal=True, batch_size=8)
    assert two["feats"].shape == one.shape == (70, 48) and two["ok"].all() and ok.all()
    torch.testing.assert_close(two["feats"], one, rtol=0, atol=1e-6)
    # Order: each row is the feature of the image at that position of the subset.
    alone = extract_features(untrained_model(), dataset, two["indices"][5:6], causal=True, batch_size=1)[0]
    torch.testing.assert_close(two["feats"][5:6], alone, rtol=0, atol=1e-6)


def test_rankme_against_numpy_svd_on_a_known_spectrum():
    rng = np.random.default_rng(0)
    spectrum = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    u, _ = np.linalg.qr(rng.normal(size=(300, 8)))
    v, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    x = u @ np.diag(spectrum) @ v.T
    p = spectrum / spectrum.sum() + 1e-7
    expected = math.exp(-(p * np.log(p)).sum())
    assert effective_rank(torch.tensor(np.linalg.svd(x, compute_uv=False))) == pytest.approx(
        expected, rel=1e-9
    )
    assert effective_rank_from_gram(torch.tensor(x.T @ x)) == pytest.approx(expected, rel=1e-6)
    # Batch by batch: the mean of per-batch X^T X / rows has the same spectrum's shape.
    parts = torch.tensor(x, dtype=torch.float32).split(100)
    mean_gram = sum(gram(part) for part in parts) / len(parts)
    assert effective_rank_from_gram(mean_gram) == pytest.approx(expected, rel=1e-4)
    assert effective_rank(torch.ones(4)) == pytest.approx(4, rel=1e-5)  # a flat spectrum: full rank


def test_trivial_predictors_against_a_hand_computation():
    # One image: [CLS] and three patches in 2-d.
    target = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]])
    unit = F.normalize(target[0], dim=-1)
    patches = unit[1:]
    mean = patches.mean(0) / patches.mean(0).norm()
    expected_mean = -sum(float(p @ mean) for p in patches) / 3
    expected_copy = -sum(float(unit[t] @ unit[t + 1]) for t in range(3)) / 3
    losses = trivial_prediction_losses(target)
    assert losses["mean_target"].item() == pytest.approx(expected_mean, abs=1e-6)
    assert losses["copy_last"].item() == pytest.approx(expected_copy, abs=1e-6)
    # A perfect model closes the whole gap; one as good as the better trivial predictor none of it.
    trivial = {k: v.item() for k, v in losses.items()}
    best = min(trivial.values())
    assert gap_closed(-1.0, trivial) == pytest.approx(1.0)
    assert gap_closed(best, trivial) == pytest.approx(0.0)
    assert gap_closed(best + 0.1, trivial) < 0


@pytest.mark.slow
def test_probes_during_training_and_from_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        run_dir,
        "budget.images=1280",
        "logging.eval_every=20",
        "logging.probe_every=20",
        "logging.probe_train_per_class=30",
        "logging.probe_val_per_class=15",
        "checkpoint.ema_decay=0.9",
        "checkpoint.every=40",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evals = metrics(run_dir, "eval")
    assert [m["step"] for m in evals] == [0, 20, 40]  # one line per point: loss, diagnostics and probes
    for m in evals:
        assert 0.1 < m["probe_linear_acc"] <= 1 and 0.1 < m["probe_knn_acc"] <= 1  # ten classes: chance 0.1
        assert m["probe_linear_error"] == pytest.approx(1 - m["probe_linear_acc"])
        assert m["probe_train_images"] == 300 and m["probe_val_images"] == 150
        assert 0 < m["rankme_features"] <= 1 and 0 < m["rankme_targets"] <= 1 and "val_gap_closed" in m
        assert m["val_loss_copy_last"] > -1 and m["val_loss_mean_target"] > -1
    subsets = json.loads((run_dir / "run.json").read_text())["probe_subsets"]
    assert subsets["train"]["images"] == 300 and subsets["val"]["classes"] == 10
    for extra in ([], ["--ema", "--bidirectional"]):
        out = subprocess.run(
            [sys.executable, "-m", "nepa_scale.cli", "probe", str(run_dir), *extra],
            capture_output=True,
            text=True,
            env=env(),
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "linear probe" in out.stdout
    record = json.loads((run_dir / "probes" / "step_00000040_ema_bidir.json").read_text())
    assert record["weights"] == "ema" and record["causal"] is False and record["n_test"] == 150
    online = json.loads((run_dir / "probes" / "step_00000040.json").read_text())
    assert online["linear_acc"] == pytest.approx(evals[-1]["probe_linear_acc"], abs=1e-6)  # the same probe


def test_a_probe_on_one_class_fails_before_the_engine_starts(tmp_path):
    data = photo_folder(tmp_path / "data" / "train", classes=1, per_class=40).parent
    shutil.copytree(data / "train", data / "val")
    result = run_train(
        tmp_path / "run",
        "data.kind=imagefolder",
        f"data.root={data}",
        "budget.images=64",
        "logging.probe_every=1",
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("nepa-scale: error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines == [
        "nepa-scale: error: logging.probe_every: the 40 training images of the probe have a single label: a "
        "probe needs at least two classes (turn logging.probe_every off for unlabelled data)"
    ]
    assert not (tmp_path / "run" / "run.json").exists()  # before the engine: nothing started


# ----------------------------------------------------------------------------- k-fold probe


@pytest.mark.parametrize("weight_decay", [1e-3])
def test_the_k_fold_probe_equals_scikit_learn_cross_val_score_on_the_same_folds(digit_features, weight_decay):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y, val_x, val_y = digit_features
    x, y = torch.cat([train_x, val_x]), torch.cat([train_y, val_y])  # the pool: train and val subsets
    folds = stratified_folds(y.numpy(), 5, seed=0)
    ours = cross_validated_probe(x, y, torch.from_numpy(folds), weight_decays=(weight_decay,))
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(5)]
    fold_size = len(y) * 4 / 5  # scikit-learn's C is per image of a fold's training part
    reference = make_pipeline(
        StandardScaler(), LogisticRegression(C=1 / (weight_decay * fold_size), max_iter=5000)
    )
    scores = cross_val_score(reference, x.numpy(), y.numpy(), cv=splits)
    theirs = np.average(scores, weights=[len(test) for _, test in splits])  # every image once
    assert abs(ours.linear_acc - theirs) <= 0.01, (ours.linear_acc, theirs)
    assert ours.folds == 5 and ours.n_test == len(y) and ours.linear_wd == weight_decay
    assert cross_validated_probe(x, y, torch.from_numpy(folds), weight_decays=(weight_decay,)) == ours


def test_stratified_folds_are_balanced_and_fixed_by_the_seed_alone():
    labels = np.array(DigitsDataset("train", 16, None).labels + DigitsDataset("val", 16, None).labels)
    folds = stratified_folds(labels, 5, seed=0)
    sizes = np.bincount(folds)
    assert len(sizes) == 5 and sizes.max() - sizes.min() <= 1
    for label in np.unique(labels):  # every class in every fold, in proportion
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert (stratified_folds(labels, 5, seed=0) == folds).all()
    assert (stratified_folds(labels, 5, seed=1) != folds).any()


FOLDS = [
    "logging.eval_every=10",
    "logging.probe_every=10",
    "logging.probe_train_per_class=12",
    "logging.probe_val_per_class=6",
    "logging.probe_folds=4",
    "checkpoint.every=10",
]


@pytest.mark.slow
def test_every_run_of_a_study_and_every_resume_probe_the_same_folds(tmp_path):
    records = {}
    for seed in (0, 1):  # two runs of a study: other seeds, the same probe images and folds
        run_dir = tmp_path / f"seed{seed}"
        result = run_train(run_dir, "budget.images=640", f"seed={seed}", *FOLDS)
        assert result.returncode == 0, result.stderr[-3000:]
        records[seed] = json.loads((run_dir / "run.json").read_text())["probe_subsets"]
        evals = metrics(run_dir, "eval")
        assert [m["step"] for m in evals] == [0, 10, 20]
        for m in evals:  # cross-validated over the 120 + 60 pooled images: a grain of 1/180
            assert m["probe_folds"] == 4 and m["probe_val_images"] == 180
            assert 0 < m["probe_linear_error"] < 0.9
            assert m["probe_linear_error"] * 180 == pytest.approx(
                round(m["probe_linear_error"] * 180), abs=1e-6
            )
    assert (
        records[0] == records[1]
        and records[0]["folds"]["k"] == 4
        and len(records[0]["folds"]["digest"]) == 16
    )
    run_dir = tmp_path / "resumed"  # cut after its first checkpoint, resumed: the folds it recorded
    cut = run_and_signal(run_dir, "budget.images=960", *FOLDS, at_step=12)
    assert cut.returncode == 75, cut.stderr[-3000:]
    changed = run_train(run_dir, "budget.images=960", *FOLDS, "logging.probe_folds=3")
    lines = [line for line in changed.stderr.splitlines() if line.startswith("nepa-scale: error:")]
    assert changed.returncode != 0 and len(lines) == 1 and "Traceback" not in changed.stderr, changed.stderr[
        -3000:
    ]
    assert lines[0].startswith("nepa-scale: error: logging.probe_folds: the run probed with 4 before")
    resumed = run_train(run_dir, "budget.images=960", *FOLDS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["restarts"] and info["probe_subsets"] == records[0]


@pytest.mark.parametrize(
    "folds,error",
    [
        ("1", "logging.probe_folds: must be >= 2 (or null: score the val subset), got 1"),
        (
            "7",
            "logging.probe_folds: 7 folds need at least 7 probe images of every class, but class 0 has 6 "
            "(train and val subsets together): use fewer folds or more images per class",
        ),
    ],
)
def test_bad_probe_folds_are_refused_in_one_line_naming_the_key(tmp_path, folds, error):
    result = run_train(
        tmp_path / "run",
        "budget.images=64",
        "logging.probe_every=1",
        "logging.probe_train_per_class=4",
        "logging.probe_val_per_class=2",
        f"logging.probe_folds={folds}",
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("nepa-scale: error:")]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines == [f"nepa-scale: error: {error}"]
    assert not (tmp_path / "run" / "run.json").exists()
