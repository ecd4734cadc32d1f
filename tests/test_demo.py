"""The README's main job, reduced: `nepa-scale demo` on a smaller copy of sweeps/demo.yaml.

Same command, same executor (local processes), same preemption, same report; only the widths and
budgets are cut so it fits the CI budget. The full demo is timed by benchmarks/demo.sh.
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from helpers import REPO, env


def test_demo_trains_survives_a_preemption_and_writes_the_report(tmp_path):
    spec = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "digits_tiny.yaml")
    spec["set"].update({"budget.global_batch": 64, "checkpoint.every": 20, "logging.log_every": 5})
    spec["axes"] = [
        {"zip": {"model.overrides.dim": [16, 32, 64], "model.overrides.num_heads": [1, 2, 4]}},
        {"grid": {"budget.images": [3200, 9600]}},  # 50 and 150 steps
    ]
    sweep = tmp_path / "demo_small.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    out_root = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "nepa_scale.cli",
        "demo",
        "--sweep",
        str(sweep),
        "--output-root",
        str(out_root),
    ]
    result = subprocess.run(
        [*command, "--bootstrap", "200"], capture_output=True, text=True, env=env(), cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "preempting" in out and "resumed 1x" in out
    assert "compute frontier" in out and "alpha =" in out
    report = out_root / "report"
    html = (report / "report.html").read_text()
    assert "<img" in html and "Chinchilla" in html
    for figure in ("loss_curves", "loss_vs_params"):
        assert (report / "figures" / f"{figure}.png").stat().st_size > 10_000
    fits = json.loads((report / "fits.json").read_text())
    assert "frontier" in fits["fits"]
    runs = [json.loads(p.read_text()) for p in out_root.glob("*/run.json")]
    assert len(runs) == 6 and all(r["status"] == "completed" for r in runs)
    assert sum(len(r.get("restarts", [])) for r in runs) == 1

    # A second call trains nothing and only rebuilds the report.
    again = subprocess.run(
        [*command, "--bootstrap", "50"], capture_output=True, text=True, env=env(), cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 runs already done, 0 to train" in again.stdout
