"""Segmentation (issue: ADE20K transfer), its first parts: the ADE20K layout, the mIoU metric and
the feature pyramid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nepa_scale.data.segmentation import IGNORE_INDEX, Ade20kPairs, reduce_zero_label
from nepa_scale.errors import DataError
from nepa_scale.eval.segmentation import confusion_matrix, iou_per_class, mean_iou


def test_miou_matches_an_independent_count_and_leaves_ignored_pixels_out():
    rng = np.random.default_rng(0)
    classes = 6
    target = rng.integers(0, classes, size=(4, 32, 32))
    target[rng.random(target.shape) < 0.2] = IGNORE_INDEX
    target[target == 5] = 0  # class 5 never present ...
    prediction = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, classes, size=target.shape))
    prediction[prediction == IGNORE_INDEX] = 0
    prediction[prediction == 4] = 1  # ... and class 4 present but never predicted

    halves = [
        confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), classes)
        for p, t in ((prediction[:2], target[:2]), (prediction[2:], target[2:]))
    ]
    ious = iou_per_class(halves[0] + halves[1]).numpy()

    valid = target != IGNORE_INDEX
    expected = []
    for c in range(classes):  # per class, by definition, on the pixels that are not ignored
        inter = np.sum((prediction == c) & (target == c) & valid)
        union = np.sum(((prediction == c) | (target == c)) & valid)
        expected.append(inter / union if union else np.nan)
    np.testing.assert_allclose(ious, expected, equal_nan=False)
    assert ious[4] == 0.0 and ious[5] == 0.0  # present but never predicted; predicted but never present
    assert mean_iou(halves[0] + halves[1]) == pytest.approx(np.nanmean(expected))
    assert np.isnan(iou_per_class(confusion_matrix(torch.zeros(3), torch.zeros(3), 3))[1])  # absent: no IoU


def _write_ade(root, names, size=(20, 12), bad=None):
    for folder in ("training", "validation"):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / "training" / f"{name}.jpg"
        )
        label = rng.integers(0, 151, (size[1], size[0]), dtype=np.uint8)
        label[0, :3] = [0, 1, 150]
        Image.fromarray(label, mode="L").save(root / "annotations" / "training" / f"{name}.png")
    if bad:
        (root / "annotations" / "training" / f"{bad}.png").write_bytes(b"not a png")


def test_ade20k_layout_loads_with_zero_ignored_and_classes_shifted(tmp_path):
    _write_ade(tmp_path, ["ADE_train_00000001", "ADE_train_00000002"])
    pairs = Ade20kPairs(tmp_path, "train")
    image, label = pairs.load(1)
    raw = np.asarray(Image.open(pairs.pairs[1][1]))
    assert image.size == (20, 12) and label.shape == (12, 20)
    assert list(label[0, :3]) == [IGNORE_INDEX, 0, 149]
    assert np.array_equal(label, reduce_zero_label(raw))
    assert np.array_equal(label[raw > 0], raw[raw > 0] - 1) and (label[raw == 0] == IGNORE_INDEX).all()
    assert label[label != IGNORE_INDEX].max() <= 149

    with pytest.raises(DataError, match="no images"):
        Ade20kPairs(tmp_path, "val")


def test_ade20k_missing_or_corrupt_annotations_name_the_file(tmp_path):
    _write_ade(tmp_path, ["a", "b"], bad="b")
    (tmp_path / "images" / "training" / "c.jpg").write_bytes(
        (tmp_path / "images" / "training" / "a.jpg").read_bytes()
    )
    with pytest.raises(DataError, match=r"annotation missing for .*c\.jpg.*c\.png"):
        Ade20kPairs(tmp_path, "train")
    (tmp_path / "images" / "training" / "c.jpg").unlink()
    pairs = Ade20kPairs(tmp_path, "train")
    with pytest.raises(DataError, match=r"cannot read annotation .*b\.png"):
        pairs.load(1)
    with pytest.raises(DataError, match="directory not found"):
        Ade20kPairs(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("name", ["nepa_s14", "nepa_b14", "nepa_l14", "nepa_h14"])
def test_pyramid_levels_have_the_strides_and_channels_the_decoder_expects(name):
    from nepa_scale.models.segmentation import SEGMENT_CROP, FeaturePyramid, feature_blocks
    from nepa_scale.models.zoo import get_arch

    arch = get_arch(name)
    grid = SEGMENT_CROP // arch.patch_size
    assert grid * arch.patch_size == SEGMENT_CROP and SEGMENT_CROP >= 512  # 518 = 37 x 14
    blocks = feature_blocks(arch.depth)
    assert len(blocks) == 4 and blocks[-1] == arch.depth and list(blocks) == sorted(set(blocks))
    with torch.no_grad():
        levels = FeaturePyramid(arch.dim).eval()([torch.zeros(1, arch.dim, grid, grid)] * 4)
    strides = [arch.patch_size / 4, arch.patch_size / 2, arch.patch_size, arch.patch_size * 2]
    for level, stride in zip(levels, strides, strict=True):
        assert level.shape == (1, arch.dim, int(SEGMENT_CROP // stride), int(SEGMENT_CROP // stride))


def test_upernet_and_auxiliary_heads_predict_at_the_finest_and_third_levels():
    from nepa_scale.models.segmentation import FCNHead, FeaturePyramid, UPerHead

    dim, grid, classes = 32, 9, 7
    grids = [torch.randn(2, dim, grid, grid, requires_grad=True) for _ in range(4)]
    levels = FeaturePyramid(dim)(grids)
    logits = UPerHead(dim, classes, channels=16)(levels)
    aux = FCNHead(dim, classes, channels=8)(levels)
    assert logits.shape == (2, classes, 4 * grid, 4 * grid) and aux.shape == (2, classes, grid, grid)
    logits.square().sum().backward()  # every block's features reach the decoder's output
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in grids)
