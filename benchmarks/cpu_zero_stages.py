"""Step time of nepa_tiny (batch 128, 16 px digits) on CPU for each ZeRO stage, through `nepa-scale train`.

Usage: python benchmarks/cpu_zero_stages.py [STEPS]. Reads each run's metrics.jsonl (the first log
interval, which holds start-up, is dropped) and prints a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(steps: int = 50) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (0, 1, 2, 3):
            run_dir = Path(tmp) / f"z{stage}"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "nepa_scale.cli",
                    "train",
                    str(REPO / "configs" / "digits_tiny.yaml"),
                    f"output_dir={run_dir}",
                    f"deepspeed.zero_stage={stage}",
                    f"budget.images={128 * steps}",
                    "logging.log_every=10",
                    "logging.eval_every=0",
                    "checkpoint.every=100000",
                    "logging.progress=never",
                ],
                check=True,
                capture_output=True,
                cwd=REPO,
            )
            lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rates = [m["img_per_s"] for m in lines if m.get("kind") == "train"][1:]
            rate = statistics.median(rates)
            rows.append((stage, 128 / rate * 1000, rate))
    print("| ZeRO stage | step time (ms, batch 128) | img/s |\n|---|---|---|")
    for stage, ms, rate in rows:
        print(f"| {stage} | {ms:.0f} | {rate:.0f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
