"""Scoring a finished segmentation run (``nepa-scale segment-eval``): its newest committed checkpoint
on its val split, single scale, in fp32 (a bf16 run evaluated itself in bf16 during training)."""

from __future__ import annotations

from pathlib import Path

import torch

from nepa_scale.config import config_from_dict
from nepa_scale.config.files import parse_override, set_dotted
from nepa_scale.data.segmentation import segmentation_dataset
from nepa_scale.engine.export import fp32_state_dict, newest_verified
from nepa_scale.engine.tasks import SegmentTask
from nepa_scale.engine.tasks.segment import SEGMENT_EVAL_FILE
from nepa_scale.errors import ConfigError
from nepa_scale.eval.segmentation import score_images, summary
from nepa_scale.rundir import RunDir, write_json_atomic


def evaluate_run(
    run_dir: str | Path,
    mode: str | None = None,
    stride: int | None = None,
    limit: int | None = None,
    data_overrides: list[str] | None = None,
) -> tuple[dict, Path]:
    """Score a segmentation run's newest committed checkpoint on its val split (single scale, fp32,
    the run's mode and stride unless given); writes RUN_DIR/segment_eval.json."""
    run = RunDir(run_dir)
    data = run.config().to_dict()
    if data["task"] != "segment":
        raise ConfigError(f"segment-eval: {run.root} is a {data['task']} run, not a segmentation run")
    for item in data_overrides or []:
        set_dotted(data, *parse_override(f"data.{item}", "--data"))
    config = config_from_dict(data)
    sg = config.segment
    checkpoint = newest_verified(run)
    model = SegmentTask.new_model(config, SegmentTask.resolve_arch(config), attention="sdpa")
    model.load_state_dict(fp32_state_dict(checkpoint))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    dataset = segmentation_dataset(config.data, sg, "val", train=False)
    count = min(len(dataset), limit or len(dataset))
    mode, stride = mode or sg.eval_mode, stride or sg.eval_stride
    confusion = score_images(
        lambda x: model(x).logits,
        dataset,
        list(range(count)),
        sg.num_classes,
        sg.crop,
        model.backbone.arch.patch_size,
        mode,
        stride,
        device,
        num_workers=config.data.num_workers,
        worker_start=config.data.worker_start,
    )
    record = {
        "step": checkpoint.step,
        "images": count,
        "mode": mode,
        "precision": "fp32",
        **summary(confusion),
    }
    out = run.root / SEGMENT_EVAL_FILE
    write_json_atomic(out, record)
    return record, out
