"""Segmentation (task: segment): the ADE20K layout and pipelines, the mIoU metric, the pyramid and
heads, a real miniature task trained from pretrained and from random weights, exact resume after a
real SIGUSR2, and the mIoU carried into the study table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, cli, env, final_weights, losses, metrics, run_and_signal, run_train
from PIL import Image

from nepa_scale.config.files import parse_override
from nepa_scale.data.segmentation import (
    IGNORE_INDEX,
    Ade20kPairs,
    SegmentationDataset,
    SegmentAugment,
    reduce_zero_label,
    rescale_size,
)
from nepa_scale.errors import ConfigError, DataError
from nepa_scale.eval.segmentation import confusion_matrix, iou_per_class, mean_iou, window_boxes
from nepa_scale.launch.sweep import load_sweep

SEGMENT_CONFIG = REPO / "configs" / "segment_digits_tiny.yaml"


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
    from nepa_scale.data import check_training_data

    with pytest.raises(DataError, match=r"cannot read annotation .*b\.png"):  # before a run's engine starts
        check_training_data(SegmentationDataset(pairs, SegmentAugment(crop=14), train=True), 1)
    from torch.utils.data import DataLoader

    from nepa_scale.cli.errors import one_line as _one_line

    loader = DataLoader(SegmentationDataset(pairs, SegmentAugment(crop=14), train=True), num_workers=1)
    with pytest.raises(DataError) as raised:  # found later, in a loader worker: the CLI's line names it
        list(loader)
    assert raised.value.args[0].startswith("Caught DataError")
    assert _one_line(raised.value).startswith(f"data: cannot read annotation {pairs.pairs[1][1]}")
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


def test_ade20k_pipelines_give_crops_for_training_and_whole_images_for_evaluation(tmp_path):
    _write_ade(tmp_path, ["a", "b"], size=(64, 48))
    aug = SegmentAugment(crop=28, scale=(64, 32), ratio_range=(0.5, 2.0), cat_max_ratio=0.75)
    train = SegmentationDataset(Ade20kPairs(tmp_path, "train"), aug, train=True)
    image, label = train[(1, 7)]
    again = train[(1, 7)]
    assert torch.equal(image, again[0]) and torch.equal(label, again[1])  # a function of the sample seed
    assert image.shape == (3, 28, 28) and label.shape == (28, 28) and label.dtype == torch.long
    assert set(label.unique().tolist()) <= set(range(150)) | {IGNORE_INDEX}
    draws = [train[(0, seed)] for seed in range(12)]
    rows = [(img, (lab == IGNORE_INDEX).all(dim=1)) for img, lab in draws]  # label rows all ignored
    padded = [(img, ignored) for img, ignored in rows if ignored.any()]  # resized below the crop
    assert padded and all((img[:, ignored] == 0).all() for img, ignored in padded)  # 0 after normalisation
    assert len({tuple(d[1].flatten()[:50].tolist()) for d in draws}) > 6  # the crops differ
    val = SegmentationDataset(Ade20kPairs(tmp_path, "train"), aug, train=False)
    image, label = val[0]
    assert image.shape == (3, 32, 43) and label.shape == (
        48,
        64,
    )  # resized to fit (64, 32); labels as annotated
    assert rescale_size(640, 480, (2048, 512)) == (683, 512)  # mmcv's keep-ratio rule


def test_sliding_windows_cover_the_image_as_mmsegmentation_places_them():
    boxes = window_boxes(512, 683, 518, 345)
    assert boxes == [(0, 0, 512, 518), (0, 165, 512, 683)]  # shorter than the crop: one row, padded
    boxes = window_boxes(1000, 700, 518, 345)
    cover = np.zeros((1000, 700), int)
    for top, left, bottom, right in boxes:
        assert bottom - top == 518 and right - left == 518
        cover[top:bottom, left:right] += 1
    assert cover.min() >= 1 and len(boxes) == 3 * 2


def test_segment_config_errors_name_the_key():
    from nepa_scale.config import load_config

    for overrides, key in (
        (["data.kind=digits"], "data.kind"),
        (["segment.crop=42"], "segment.crop"),
        (["segment.feature_blocks=[2, 1, 2, 2]"], "segment.feature_blocks"),
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
        (["segment.eval_mode=tiles"], "segment.eval_mode"),
    ):
        with pytest.raises(ConfigError, match=f"^{key}"):
            load_config(SEGMENT_CONFIG, overrides)
    with pytest.raises(ConfigError, match="^data.kind"):
        load_config(REPO / "configs" / "digits_tiny.yaml", ["data.kind=digit_canvas"])


def test_every_shipped_config_validates_and_the_segmentation_recipes_say_what_docs_cite():
    from nepa_scale.config import config_from_dict
    from nepa_scale.config.files import read_yaml_mapping

    configs = {
        path.stem: config_from_dict(read_yaml_mapping(path)) for path in (REPO / "configs").glob("*.yaml")
    }
    b, l14 = configs["segment_ade20k_b14"], configs["segment_ade20k_l14"]
    for config, lr, decay, drop, blocks, width in (
        (b, 1e-4, 0.65, 0.1, [4, 6, 8, 12], 768),
        (l14, 2e-5, 0.95, 0.2, [8, 12, 16, 24], 1024),
    ):
        sg, o = config.segment, config.optim
        assert (o.lr, o.betas, o.weight_decay, o.schedule, o.warmup_steps, o.clip_grad) == (
            lr,
            (0.9, 0.999),
            0.05,
            "poly",
            1500,
            0,
        )
        assert (sg.layer_decay, sg.drop_path, sg.feature_blocks, sg.decoder_channels, sg.aux_weight) == (
            decay,
            drop,
            blocks,
            width,
            0.4,
        )
        assert (
            config.budget.images // config.budget.global_batch == 160_000 and config.budget.global_batch == 16
        )
        assert (sg.crop, sg.scale, sg.ratio_range, sg.cat_max_ratio, sg.eval_mode) == (
            518,
            (2072, 518),
            (0.5, 2.0),
            0.75,
            "slide",
        )


def test_layer_decay_scales_are_mmsegmentations_for_beit_and_mae():
    """mmseg's LayerDecayOptimizerConstructor: N = depth + 2 layer ids, the stem 0, block i i + 1, the
    rest N - 1; scale = decay ** (N - 1 - id)."""
    from nepa_scale.engine.tasks import layer_decay_groups
    from nepa_scale.models.segmentation import NepaSegmenter
    from nepa_scale.models.zoo import get_arch

    model = NepaSegmenter(
        get_arch("nepa_tiny", dim=32, depth=4, num_heads=2), 5, None, 16, 8, attention="math"
    )
    groups = layer_decay_groups(model, 1.0, 0.05, layer_decay=0.5)
    scale = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    by_name = {name: scale[id(p)] for name, p in model.named_parameters()}
    assert by_name["backbone.patch_embed.proj.weight"] == by_name["backbone.cls_token"] == 0.5**5
    assert [by_name[f"backbone.blocks.{i}.attn.qkv.weight"] for i in range(4)] == [
        0.5**4,
        0.5**3,
        0.5**2,
        0.5,
    ]
    assert (
        by_name["decode_head.fuse.0.weight"]
        == by_name["pyramid.up2.weight"]
        == by_name["aux_head.conv.0.weight"]
        == 1.0
    )


@pytest.mark.parametrize("name", ["nepa_tiny", "nepa_b14"])
def test_segmentation_flops_count_the_heads_and_match_torchs_count_of_the_whole_model(name):
    """flops_per_image: the backbone by the 6N+attn formula, the pyramid and heads counted; together
    three times what torch counts for the real model's training forward (B/14: heads are 80%)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nepa_scale.config import load_config
    from nepa_scale.engine.tasks import SegmentTask
    from nepa_scale.models.segmentation import NepaSegmenter

    overrides = [f"model.name={name}", "model.overrides={}"]
    if name == "nepa_b14":
        overrides += ["segment.crop=518", "segment.decoder_channels=768", "segment.aux_channels=256"]
    config = load_config(SEGMENT_CONFIG, overrides)
    arch = SegmentTask.resolve_arch(config)
    sg = config.segment
    with torch.device("meta"):
        model = NepaSegmenter(
            arch, sg.num_classes, None, sg.decoder_channels, sg.aux_channels, attention="math"
        )
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(2, 3, sg.crop, sg.crop))
    counted = 3 * counter.get_total_flops() / 2
    assert SegmentTask.flops_per_image(config, arch) == pytest.approx(counted, rel=1e-3)


def test_sweep_plan_counts_a_segmentation_run_as_the_trainer_does(tmp_path):
    """Steps of an epochs budget from the canvases, parameters and FLOPs with the pyramid and heads."""
    from nepa_scale.engine.tasks import SegmentTask
    from nepa_scale.launch.plan import plan_run

    path = tmp_path / "seg.yaml"
    spec = {"base": str(SEGMENT_CONFIG), "set": {"budget.images": None, "budget.epochs": 2}, "profile": "cpu"}
    path.write_text(yaml.safe_dump({**spec, "output_root": str(tmp_path / "runs")}))
    (run,) = load_sweep(path).runs
    plan = plan_run(run)
    assert plan.error is None and plan.images == 2 * (1024 // 16) * 16  # 1,024 training canvases
    arch = SegmentTask.resolve_arch(run.config)
    model = SegmentTask.new_model(run.config, arch, "math")
    assert plan.params == sum(p.numel() for p in model.parameters())
    assert plan.flops == pytest.approx(plan.images * SegmentTask.flops_per_image(run.config, arch))


def test_poly_schedule_decays_linearly_over_the_whole_run_after_warmup():
    from nepa_scale.config import OptimConfig
    from nepa_scale.engine.schedule import lr_factor

    factor = lr_factor(OptimConfig(schedule="poly", warmup_steps=10), 100, 1e-3)
    assert factor(0) == 0 and factor(5) == pytest.approx(0.5 * 0.95)  # warmup scales the poly value
    assert factor(10) == pytest.approx(0.9) and factor(55) == pytest.approx(0.45) and factor(100) == 0


# A cheap miniature: the decoder narrower and the run shorter than configs/segment_digits_tiny.yaml's.
MINI = [
    "logging.progress=never",
    "segment.decoder_channels=48",
    "segment.aux_channels=24",
    "budget.images=3200",
    "logging.log_every=10",
    "logging.eval_every=0",
    "model.overrides={dim: 64, depth: 2, num_heads: 4}",
    "budget.global_batch=16",
    "optim.lr=3e-3",
]


def _segment_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nepa_scale.cli",
        "train",
        str(SEGMENT_CONFIG),
        f"output_dir={run_dir}",
        *MINI,
        *overrides,
    ]


@pytest.mark.slow
def test_miniature_segmentation_learns_attaches_to_its_study_and_enters_the_table(tmp_path):
    """Digits on 40 px canvases, 11 classes: 200 steps raise mIoU well above predicting background
    everywhere, from a demo-size pretrained model and from random weights (both reported, neither
    asserted to win). The fine-tune is planned by the study's attach: entry, and the study table
    carries its mIoU on the pretraining run's row."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "base": str(REPO / "configs" / "digits_tiny.yaml"),
                "set": {
                    "model.overrides": {"dim": 64, "depth": 2, "num_heads": 4},
                    "budget.global_batch": 64,
                    "deepspeed.zero_stage": 0,
                    "logging.progress": "never",
                    "logging.eval_every": 0,
                },
                "axes": [{"grid": {"budget.images": [19200]}}],
                "profile": "cpu",
                "output_root": str(tmp_path / "study"),
                "attach": {"segment": {"sweep": "segment.yaml", "budgets": [19200]}},
            }
        )
    )
    (tmp_path / "segment.yaml").write_text(
        yaml.safe_dump(
            {"base": str(SEGMENT_CONFIG), "set": dict(parse_override(o) for o in MINI), "profile": "cpu"}
        )
    )
    from nepa_scale.workflows.attach import attached_sweep, export_sources

    study = load_sweep(study_file)
    pretrain_file = tmp_path / "pretrain.yaml"  # the planned run, trained as its job would train it
    pretrain_file.write_text(yaml.safe_dump(study.runs[0].config_data))
    pretrained = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "train", str(pretrain_file)],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert pretrained.returncode == 0, pretrained.stderr[-3000:]
    attached = attached_sweep(study, "segment")
    assert export_sources(attached) == [study.runs[0].run_dir]  # the weights the fine-tune starts from
    (planned,) = attached.runs
    source = study.runs[0]
    assert (
        planned.config.segment.pretrained == str(source.run_dir) and planned.config.seed == source.config.seed
    )
    assert planned.config.model.overrides == source.config.model.overrides
    assert planned.run_dir.parent == tmp_path / "study_segment"

    runs = {"pretrained": planned.run_dir, "scratch": tmp_path / "scratch"}
    config_file = tmp_path / "attached.yaml"
    config_file.write_text(yaml.safe_dump(planned.config_data))
    commands = {
        "pretrained": [sys.executable, "-m", "nepa_scale.cli", "train", str(config_file)],
        "scratch": _segment_cmd(runs["scratch"]),
    }
    procs = [  # two single-threaded runs at once: the machine has two cores
        subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in commands.values()
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]

    from nepa_scale.data.segmentation import DigitCanvases

    val = DigitCanvases("val")
    background = np.mean([(val.load(i)[1] == 0).mean() for i in range(len(val))])
    trivial = background / 11  # background's IoU is its share; every digit class is present, at IoU 0
    miou = {name: metrics(run, "eval")[-1]["val_miou"] for name, run in runs.items()}
    print(
        f"miniature mIoU: pretrained {miou['pretrained']:.3f}, scratch {miou['scratch']:.3f}, "
        f"all-background {trivial:.3f}"
    )
    assert all(value > 2 * trivial for value in miou.values()), (miou, trivial)
    record = json.loads((runs["pretrained"] / "segment_eval.json").read_text())
    assert len(record["iou_per_class"]) == 11 and record["miou"] == pytest.approx(miou["pretrained"])

    evaluated = cli("segment-eval", str(runs["scratch"]))  # a finished run, scored again from its checkpoint
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    again = json.loads((runs["scratch"] / "segment_eval.json").read_text())["miou"]
    assert again == pytest.approx(miou["scratch"], abs=1e-6)

    from nepa_scale.scaling.collect import collect

    table = collect(tmp_path / "study")
    row = table[table["eval_point"] == "final"].iloc[0]
    assert row["miou"] == pytest.approx(miou["pretrained"]) and row["seg_error"] == pytest.approx(
        1 - row["miou"]
    )


def test_attach_entries_fail_with_one_line_naming_the_key(tmp_path):
    from nepa_scale.workflows.attach import attached_sweep

    def study(attach) -> Path:
        path = tmp_path / "study.yaml"
        spec = {"base": str(REPO / "configs" / "digits_tiny.yaml"), "profile": "cpu", "attach": attach}
        path.write_text(yaml.safe_dump({**spec, "output_root": str(tmp_path / "study")}))
        return path

    for attach, match in (
        ({"seg": {"sweep": "seg.yaml", "every": 2}}, r"attach\.seg\.every: unknown key"),
        ({"seg": ["seg.yaml"]}, r"attach\.seg: expected"),
        ({"seg": {"sweep": "seg.yaml", "per_model": ["x"]}}, r"attach\.seg\.per_model: expected a mapping"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_sweep(study(attach))
    sweep = load_sweep(study({"seg": {"sweep": "seg.yaml", "budgets": [19200]}}))  # planned without it
    with pytest.raises(ConfigError, match=r"attach\.seg\.sweep: file not found: .*seg\.yaml"):
        attached_sweep(sweep, "seg")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump({"base": str(SEGMENT_CONFIG)}))
    with pytest.raises(
        ConfigError, match=r"attach\.seg: no completed pretraining run with budget\.images in \[19200\]"
    ):
        attached_sweep(sweep, "seg")
    with pytest.raises(ConfigError, match=r"no attach\.other \(have: seg\)"):
        attached_sweep(sweep, "other")


def test_segmentation_resumes_bitwise_after_a_real_preemption_signal(tmp_path):
    common = [
        *MINI,
        "budget.images=480",
        "segment.decoder_channels=16",
        "segment.aux_channels=8",
        "deepspeed.zero_stage=1",
        "logging.log_every=1",
        "model.overrides={dim: 32, depth: 2, num_heads: 2}",
    ]
    full = run_train(tmp_path / "full", *common, config=SEGMENT_CONFIG)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = run_and_signal(tmp_path / "cut", *common, at_step=12, config=SEGMENT_CONFIG)
    assert cut.returncode == 75, cut.stderr[-3000:]
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "preempted"
    resumed = run_train(tmp_path / "cut", *common, config=SEGMENT_CONFIG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(a) == 30 and a == b, [(s, a[s], b.get(s)) for s in a if a[s] != b.get(s)][:5]
    wa, wb = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert any("running_mean" in k for k in wa)  # BatchNorm statistics are part of the state
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (
        metrics(tmp_path / "cut", "eval")[-1]["val_miou"]
        == metrics(tmp_path / "full", "eval")[-1]["val_miou"]
    )
