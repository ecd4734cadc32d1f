"""Where a run's results come from: the code's git revision and the versions of what it ran on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def git_revision() -> str | None:
    """The commit of the checkout this package was imported from (None outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    import deepspeed
    import timm
    import torch

    import nepa_scale

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
        "nepa_scale": nepa_scale.__version__,
        "cuda": torch.version.cuda or "",
    }


def package_dir() -> str:
    """The nepa_scale package this process imported (a launched job's is the code snapshot)."""
    return str(Path(__file__).resolve().parents[1])
