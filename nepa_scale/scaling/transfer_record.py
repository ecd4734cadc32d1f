"""``transfer.json``: what a study's transfer comparison found (written by the demo's transfer step,
nepa_scale/workflows/transfer.py; read by the report), its schema in one place.

    {"sources": [run directory, ...],          # the largest model's runs, one per seed
     "probe":    {"what": str, "pretrained": [entry, ...], "random_init": [entry, ...]},
     "finetune": {"what": str, "pretrained": [entry, ...], "scratch": [entry, ...]}}

A probe entry holds linear_acc, knn_acc and step; a fine-tune entry run, seed, val_acc, step and,
with an EMA, val_acc_ema: one entry per source seed, in the sources' order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRANSFER_FILE = "transfer.json"


@dataclass
class ProbeComparison:
    what: str
    pretrained: list[dict]
    random_init: list[dict]


@dataclass
class FinetuneComparison:
    what: str
    pretrained: list[dict] = field(default_factory=list)
    scratch: list[dict] = field(default_factory=list)


@dataclass
class TransferRecord:
    sources: list[str]
    probe: ProbeComparison
    finetune: FinetuneComparison

    def write(self, study_dir: Path) -> Path:
        path = Path(study_dir) / TRANSFER_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def read(cls, study_dir: Path) -> TransferRecord | None:
        """The study's record, or None when it has none."""
        path = Path(study_dir) / TRANSFER_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["sources"], ProbeComparison(**data["probe"]), FinetuneComparison(**data["finetune"]))

    def lines(self) -> list[str]:
        """The comparison in words (top-1 accuracy, means over the seeds, each seed's value after
        "seeds" so that it is not read as an interval), for the console and the report."""
        p, f = self.probe, self.finetune
        lines = [
            f"linear probe: pretrained {_mean_of(p.pretrained, 'linear_acc')} vs random init "
            f"{_mean_of(p.random_init, 'linear_acc')} in top-1 accuracy; kNN {_mean_of(p.pretrained, 'knn_acc')} "
            f"vs {_mean_of(p.random_init, 'knn_acc')}; {p.what}",
        ]
        if f.pretrained and f.scratch:
            ema = ""
            if all("val_acc_ema" in entry for entry in f.pretrained + f.scratch):
                ema = f"; EMA {_mean_of(f.pretrained, 'val_acc_ema')} vs {_mean_of(f.scratch, 'val_acc_ema')}"
            lines.append(
                f"few-label fine-tune: from pretrained {_mean_of(f.pretrained, 'val_acc')} vs from scratch "
                f"{_mean_of(f.scratch, 'val_acc')} in top-1 accuracy{ema}; {f.what}"
            )
        return lines


def _mean_of(entries: list[dict], key: str) -> str:
    """``0.873`` for one run; ``0.873 (seeds 0.856, 0.891)``: the mean and each seed's value."""
    values = [entry[key] for entry in entries]
    mean = f"{sum(values) / len(values):.3f}"
    return mean if len(values) == 1 else f"{mean} (seeds {', '.join(f'{v:.3f}' for v in values)})"
