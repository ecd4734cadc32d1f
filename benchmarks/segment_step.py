"""Time of one ADE20K segmentation training step (configs/segment_ade20k_b14.yaml or _l14), through
the trainer's own step, on this machine's device; and of one val image's sliding-window inference.

The data is an ADE20K-layout folder made from scikit-learn's two bundled photographs (427x640 JPEGs),
cut into 512x683-like pictures with label maps from their quantised brightness (1..150): real
images through the real pipeline (resize 0.5-2.0 of 2048x512, cat-max crop at 518, flip,
photometric distortion). The recipe's batch is 16 as 8 GPUs x 2; a micro-batch of 2 is timed here
and an iteration of 16 images is 8 of them (the same arithmetic, accumulated).

    python benchmarks/segment_step.py [--config configs/segment_ade20k_b14.yaml] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_ade_folder(root: Path, count: int = 8) -> None:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for split, folder in (("train", "training"), ("val", "validation")):
        (root / "images" / folder).mkdir(parents=True)
        (root / "annotations" / folder).mkdir(parents=True)
        for i in range(count):
            photo = Image.fromarray(photos[i % len(photos)]).resize((683, 512), Image.BILINEAR)
            if i % 2:
                photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
            label = (np.asarray(photo.convert("L")) // 17 * 10 + i) % 151  # 0 (ignored) .. 150
            photo.save(root / "images" / folder / f"ADE_{split}_{i:08d}.jpg", quality=90)
            Image.fromarray(label.astype(np.uint8), mode="L").save(
                root / "annotations" / folder / f"ADE_{split}_{i:08d}.png"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "segment_ade20k_b14.yaml"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()

    from nepa_scale.config import load_config
    from nepa_scale.engine.trainer import Trainer
    from nepa_scale.eval.segmentation import score_images

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        make_ade_folder(root)
        config = load_config(
            args.config,
            [
                f"data.root={root}",
                "data.num_workers=0",
                "segment.pretrained=null",
                f"budget.global_batch={args.micro_batch}",
                f"output_dir={Path(tmp) / 'run'}",
                "logging.progress=never",
            ],
        )
        trainer = Trainer(config)
        engine, _, _ = trainer.build_engine(resume=False)
        batches = trainer.batches()
        trainer.train_step(engine, batches, 0)  # warm-up: allocator, first-call costs
        times = []
        for step in range(1, args.steps + 1):
            start = time.perf_counter()
            trainer.train_step(engine, batches, step)
            if trainer.world.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        per_micro = float(np.median(times))
        sg, device = config.segment, trainer.world.device
        engine.eval()
        start = time.perf_counter()
        score_images(
            lambda x: engine(x).logits,
            trainer.evaluator.val_set,
            [0],
            sg.num_classes,
            sg.crop,
            trainer.arch.patch_size,
            sg.eval_mode,
            sg.eval_stride,
            device,
            trainer.settings.dtype,
        )
        inference = time.perf_counter() - start
    result = {
        "config": str(Path(args.config).relative_to(REPO)),
        "model": config.model.name,
        "crop": sg.crop,
        "micro_batch": args.micro_batch,
        "s_per_micro_batch": round(per_micro, 2),
        "s_per_iteration_of_16": round(per_micro * 16 / args.micro_batch, 1),
        "repeats": [round(t, 2) for t in times],
        "s_slide_inference_683x512": round(inference, 2),
        "params": sum(p.numel() for p in engine.module.parameters()),
        "device": str(device),
        "precision": trainer.settings.precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
