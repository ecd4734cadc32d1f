"""The README's main job, reduced: `nepa-scale demo` on a smaller copy of sweeps/demo.yaml.

Same command, same executor (local processes), same preemption, same report; only the widths and
budgets are cut so it fits the CI budget. The full demo is timed by benchmarks/demo.sh.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

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
    transfer = yaml.safe_load((REPO / "sweeps" / "demo_transfer.yaml").read_text())
    transfer["base"] = str(REPO / "configs" / "finetune_digits_tiny.yaml")
    transfer["set"].update({"budget.images": 1280, "logging.eval_every": 10})  # 20 steps of 64
    transfer_sweep = tmp_path / "transfer_small.yaml"
    transfer_sweep.write_text(yaml.safe_dump(transfer))
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
        "--transfer-sweep",
        str(transfer_sweep),
    ]
    result = subprocess.run(
        [*command, "--bootstrap", "200"], capture_output=True, text=True, env=env(), cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "preempting" in out and "resumed 1x" in out
    assert "compute frontier" in out and "Chinchilla" in out
    # The fitted quantity is the linear-probe error measured online, at every run's own points.
    assert "fits of linear-probe error" in out and "probe_linear_error" in out
    assert "candidate quantities" in out and "prediction check" in out
    # The sweep's target: the demo ends with the advisor's proposal, a sweep file `sweep launch` takes.
    proposal = out[out.index("next: the advisor's proposal") :]
    assert "now: " in proposal and ("advice: " in proposal or "no candidate run fits" in proposal)
    assert "advice: " not in proposal or (out_root / "advice" / "advice-01.yaml").is_file()
    for run in out_root.glob("*/run.json"):
        evals = [json.loads(line) for line in (run.parent / "metrics.jsonl").read_text().splitlines()]
        final = [e for e in evals if e["kind"] == "eval"][-1]
        assert {"probe_linear_error", "probe_knn_error", "val_loss", "rankme_features"} <= set(final)
    # Every fitted parameter is a value inside its 95% interval, or "not identified" with the reason.
    fits = json.loads((out_root / "report" / "fits.json").read_text())["fits"]
    for name in ("frontier", "chinchilla"):
        entry = fits[name]
        assert "params" in entry or (not entry["identified"] and entry["reason"]), entry
        for p in entry.get("params", {}).values():
            assert (p["identified"] and p["low"] <= p["value"] <= p["high"]) or (
                not p["identified"] and p["reason"]
            ), (name, p)
    # The transfer comparison: the largest model's probe against its random init, and the few-label
    # fine-tune from the pretrained weights against from scratch (their numbers are not asserted).
    probe = re.search(r"linear probe: pretrained (0\.\d+) vs random init (0\.\d+)", out)
    finetune = re.search(r"few-label fine-tune: from pretrained (0\.\d+).* vs from scratch (0\.\d+)", out)
    assert probe and finetune, out[-3000:]
    source = "dim64_num_heads4_images9600-"  # the largest model, its longest run
    transfer_json = json.loads((out_root / "transfer.json").read_text())
    assert [Path(s).name[: len(source)] for s in transfer_json["sources"]] == [source]
    assert len(transfer_json["finetune"]["pretrained"]) == len(transfer_json["finetune"]["scratch"]) == 1
    assert (out_root.parent / "runs_transfer" / "transfer_sweep.yaml").is_file()
    report = out_root / "report"
    html = (report / "report.html").read_text()
    assert "<img" in html and "Chinchilla" in html and "<h2>Transfer</h2>" in html
    assert "What this study shows" in html and "linear-probe error" in html
    assert probe.group(0) in html
    for figure in ("frontier", "loss_vs_params", "diagnostics"):  # too few runs here for a prediction check
        assert (report / "figures" / f"{figure}.png").stat().st_size > 10_000
    runs = [json.loads(p.read_text()) for p in out_root.glob("*/run.json")]
    assert len(runs) == 6 and all(r["status"] == "completed" for r in runs)
    # The probe is cross-validated over all the digits, on the same folds in every run of the study.
    folds = {json.dumps(r["probe_subsets"]["folds"], sort_keys=True) for r in runs}
    assert len(folds) == 1 and json.loads(folds.pop())["k"] == spec["set"]["logging.probe_folds"]
    assert sum(len(r.get("restarts", [])) for r in runs) == 1

    # A second call trains nothing and only rebuilds the report.
    again = subprocess.run(
        [*command, "--bootstrap", "50"], capture_output=True, text=True, env=env(), cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "6 runs already done, 0 to train" in again.stdout
    assert "few-label fine-tune" in again.stdout and "submitted" not in again.stdout
