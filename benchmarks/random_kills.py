"""Kill one node's task of a 2-node run at random moments, on the local multi-node SLURM cluster.

    python benchmarks/random_kills.py [--kills 10] [--seed 0] [--out random_kills.json]

One uninterrupted twin, then ``--kills`` runs of the same config (2 nodes x 1 task, ZeRO-2 over
gloo, 150 steps, a checkpoint every 5) in fresh output directories; each gets a SIGKILL on the task
of a random node (node1: rank 0, node2: rank 1) at a random moment of its first attempt, start-up
included: uniformly within the time the twin's job ran. Every run must then complete by itself (the survivor records the run interrupted and
requeues it), log every step exactly once, and end with the twin's losses and final weights, bit
for bit. Prints one line per kill and the summary; ``--out`` keeps them as JSON. Needs root and the
cluster (slurm/local/start.sh); about a minute per kill on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STEPS = 150
sys.path.insert(0, str(REPO))

from nepa_scale.engine.checkpoint_store import committed_checkpoints  # noqa: E402
from nepa_scale.engine.export import fp32_state_dict  # noqa: E402
from nepa_scale.launch.status import RunStatus, status_table, sweep_status  # noqa: E402
from nepa_scale.launch.sweep import load_sweep  # noqa: E402
from nepa_scale.rundir import RunDir  # noqa: E402

SETTINGS = {
    "model.overrides": {"dim": 48, "depth": 2, "num_heads": 2},
    "model.attention": "sdpa",
    "budget.global_batch": 32,
    "budget.images": 4800,  # 150 steps
    "deepspeed.zero_stage": 2,
    "optim.lr": 2e-3,
    "logging.log_every": 1,
    "logging.progress": "never",
    "checkpoint.every": 5,
    "distributed.timeout_s": 30,
}


def write_sweep(folder: Path, name: str) -> Path:
    spec = {
        "name": name,
        "base": str(REPO / "configs" / "digits_tiny.yaml"),
        "set": SETTINGS,
        "profile": "local_multi",
        "output_root": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def launch(path: Path):
    subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "sweep", "launch", str(path)],
        check=True,
        capture_output=True,
    )
    return load_sweep(path)


def wait(sweep, timeout: float = 600, poll: float = 1.0, settle: float = 60.0) -> RunStatus:
    """The run's row once it completed, failed or was cancelled, or once it has sat in another
    stopped state for ``settle`` seconds with no job continuing it (the scheduler's view of a job
    being requeued can lag for a moment)."""
    deadline, stopped_since = time.time() + timeout, None
    while time.time() < deadline:
        (row,) = sweep_status(sweep)
        if row.state in ("completed", "failed", "cancelled"):
            return row
        if row.state in ("pending", "running", "requeued", "not launched"):
            stopped_since = None
        else:
            stopped_since = stopped_since or time.time()
            if time.time() - stopped_since > settle:
                return row
        time.sleep(poll)
    raise TimeoutError(status_table(sweep_status(sweep)))


def job_running(sweep) -> bool:
    launch_json = sweep.runs[0].run_dir / "launch.json"
    if not launch_json.is_file():
        return False
    job = json.loads(launch_json.read_text())["job_id"]
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip() == "RUNNING"


def kill_task(node: int) -> int:
    """SIGKILL the run's task on ``node``: its Python process (not srun, whose command line names
    the task too: on node1 it is the job's batch step, and a dead srun ends the whole job)."""
    pids = subprocess.run(
        ["ip", "netns", "pids", f"nepa-node{node}"], capture_output=True, text=True
    ).stdout.split()
    killed = 0
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in argv and "python" in Path(argv[0]).name:
            subprocess.run(["kill", "-9", pid], check=False)
            killed += 1
    return killed


def outcome(run_dir: Path, twin: Path) -> dict:
    run = RunDir(run_dir)
    record = run.record()
    steps = [m["step"] for m in run.read_metrics() if m.get("kind") == "train"]
    losses = {m["step"]: m["loss"] for m in run.read_metrics() if m.get("kind") == "train"}
    twin_losses = {m["step"]: m["loss"] for m in RunDir(twin).read_metrics() if m.get("kind") == "train"}
    ours = committed_checkpoints(run.checkpoints)
    a = fp32_state_dict(ours[-1]) if ours else {}
    b = fp32_state_dict(committed_checkpoints(twin / "checkpoints")[-1])
    return {
        "status": record.status,
        "error": record.error,
        "interruptions": [(e.kind, e.step, e.action) for e in record.interruptions],
        "resumed_from": [r.from_step for r in record.restarts],
        "steps_once": steps == sorted(set(steps)) == list(range(1, STEPS + 1)),
        "losses_equal": losses == twin_losses,
        "weights_equal": bool(a) and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--window", type=float, default=35.0, help="seconds after the job starts to draw from"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], check=True, capture_output=True)
    rng = random.Random(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="random_kills_"))
    twin = launch(write_sweep(folder, "twin"))
    while not job_running(twin):
        time.sleep(0.05)
    started = time.time()
    row = wait(twin, poll=0.2)
    assert row.state == "completed", row.error
    window = time.time() - started  # the job's running time: start-up, training, saving, exit
    print(f"twin's job ran {window:.1f} s: {twin.runs[0].run_dir}", flush=True)
    results = []
    for i in range(args.kills):
        sweep = launch(write_sweep(folder, f"kill{i}"))
        while not job_running(sweep):
            time.sleep(0.05)
        delay, node = rng.uniform(0, window), rng.choice([1, 2])
        time.sleep(delay)
        killed = kill_task(node)
        logged = [m["step"] for m in RunDir(sweep.runs[0].run_dir).read_metrics() if m.get("kind") == "train"]
        row = wait(sweep)
        result = {
            "kill": i,
            "node": node,
            "rank": node - 1,
            "seconds_after_start": round(delay, 1),
            "step_at_kill": logged[-1] if logged else 0,
            "tasks_killed": killed,
            **outcome(sweep.runs[0].run_dir, twin.runs[0].run_dir),
        }
        results.append(result)
        print(json.dumps(result), flush=True)
    good = sum(
        r["status"] == "completed" and r["steps_once"] and r["weights_equal"] and r["losses_equal"]
        for r in results
    )
    print(f"{good} of {len(results)} runs completed, every step logged once, bitwise equal to the twin")
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": SETTINGS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
