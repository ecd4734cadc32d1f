"""Probes: separable features are probed perfectly; on the digits they run in training and from a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, env, metrics, run_train

from nepa_scale.eval.probes import knn_probe, linear_probe


def test_probes_separate_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 32)) * 6  # five well-separated classes in 32 dimensions
    labels = rng.integers(0, 5, 1000)
    feats = centres[labels] + rng.normal(0, 1, (1000, 32))
    train, test = slice(0, 800), slice(800, None)
    assert linear_probe(feats[train], labels[train], feats[test], labels[test]) >= 0.99
    assert knn_probe(feats[train], labels[train], feats[test], labels[test], k=10) >= 0.99
    shuffled = rng.permutation(labels)  # and nothing is found where there is nothing to find
    assert linear_probe(feats[train], shuffled[train], feats[test], shuffled[test]) < 0.4


@pytest.mark.slow
def test_probes_during_training_and_from_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        run_dir,
        "budget.images=1280",
        "logging.probe_every=20",
        "logging.probe_limit=600",
        "checkpoint.ema_decay=0.9",
        "checkpoint.every=40",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probes = [m for m in metrics(run_dir, "eval") if "probe_linear_acc" in m]
    assert [m["step"] for m in probes] == [20, 40]
    for m in probes:
        assert (
            0.1 < m["probe_linear_acc"] <= 1 and 0.1 < m["probe_knn_acc"] <= 1
        )  # ten classes: chance is 0.1
        assert m["probe_linear_error"] == pytest.approx(1 - m["probe_linear_acc"])
    for extra in ([], ["--ema", "--bidirectional"]):
        out = subprocess.run(
            [sys.executable, "-m", "nepa_scale.cli", "probe", str(run_dir), "--limit", "600", *extra],
            capture_output=True,
            text=True,
            env=env(),
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "linear probe" in out.stdout
    record = json.loads((run_dir / "probes" / "step_00000040_ema_bidir.json").read_text())
    assert record["weights"] == "ema" and record["causal"] is False and record["n_test"] == 229
