"""Shared helpers: run the real CLI in subprocesses, interrupt it with real signals, read its run directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits_tiny.yaml"

# A ~35k-parameter NEPA on 16 px digits: fast enough for many runs on 2 CPU cores.
SMALL = [
    "model.overrides={dim: 48, depth: 2, num_heads: 2}",
    "model.attention=sdpa",
    "budget.global_batch=32",
    "logging.log_every=1",
    "logging.eval_every=0",
    "logging.eval_batches=1",
    "logging.progress=never",
    "optim.lr=2e-3",
]


def env(**extra: str) -> dict[str, str]:
    out = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return out


def train_cmd(run_dir: Path, *overrides: str, config: Path = DIGITS_CONFIG) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nepa_scale.cli",
        "train",
        str(config),
        f"output_dir={run_dir}",
        *SMALL,
        *overrides,
    ]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    run_dir: Path, *overrides: str, nproc: int = 1, config: Path = DIGITS_CONFIG
) -> list[subprocess.Popen]:
    """Start ``nproc`` ranks the way SLURM's srun does: one process per rank, env-configured."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        extra = (
            {}
            if nproc == 1
            else dict(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(nproc),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        )
        procs.append(
            subprocess.Popen(
                train_cmd(run_dir, *overrides, config=config),
                env=env(**extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> subprocess.CompletedProcess:
    """Wait for every rank; rank 0's output, the worst exit code."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    codes = [p.returncode for p in procs]
    code = next((c for c in codes if c not in (0,)), 0)
    return subprocess.CompletedProcess(procs[0].args, code, outs[0][0], "\n".join(o[1] for o in outs))


def run_train(
    run_dir: Path, *overrides: str, nproc: int = 1, timeout: float = 600, config: Path = DIGITS_CONFIG
) -> subprocess.CompletedProcess:
    return finish(launch(run_dir, *overrides, nproc=nproc, config=config), timeout)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == kind:
            out.append(record)
    return out


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def run_and_signal(
    run_dir: Path,
    *overrides: str,
    at_step: int,
    sig: int = signal.SIGUSR2,
    nproc: int = 1,
    timeout: float = 600,
    config: Path = DIGITS_CONFIG,
) -> subprocess.CompletedProcess:
    """Start a run, send ``sig`` to every rank once metrics.jsonl shows ``at_step``, wait for the exit."""
    procs = launch(run_dir, *overrides, nproc=nproc, config=config)
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(m["step"] >= at_step for m in metrics(run_dir)):
            for p in procs:
                p.send_signal(sig)
            break
        time.sleep(0.01)
    return finish(procs, max(1.0, deadline - time.time()))


def cli(*args: str) -> subprocess.CompletedProcess:
    """``nepa-scale ARGS`` in a subprocess, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", *args], capture_output=True, text=True, env=env(), cwd=REPO
    )


def job_nodes(run_dir: Path) -> list[str]:
    """The nodes of the run's running SLURM job (its last submission), in rank order (one task per
    node: rank i runs on the i-th node of the job's node list)."""
    job = json.loads((Path(run_dir) / "launch.json").read_text())["job_id"]
    nodelist = subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not nodelist:
        return []
    return subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
    ).stdout.split()


def final_weights(run_dir: Path) -> dict:
    from nepa_scale.engine.checkpoint_store import committed_checkpoints
    from nepa_scale.engine.export import fp32_state_dict

    return fp32_state_dict(committed_checkpoints(Path(run_dir) / "checkpoints")[-1])


def photo_folder(root: Path, classes: int, per_class: int, size: int = 48) -> Path:
    """An ImageNet-style folder of real photographs (crops of scikit-learn's two sample images)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            y, x = (i * 37) % 300, (i * 53 + label * 11) % 500
            crop = photos[label % 2][y : y + size, x : x + size]
            Image.fromarray(crop).save(folder / f"img{i:03d}.JPEG", quality=90)
    return root
