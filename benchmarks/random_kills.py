"""Kill one node's task of a 2-node run at random moments of its training, on the local cluster.

    python benchmarks/random_kills.py [--kills 20] [--startup 3] [--saves 2] [--seed 0] [--out FILE]

One uninterrupted twin, then ``--kills`` runs of the same config (2 nodes x 1 task, ZeRO-2 over
gloo, 150 steps, a checkpoint every 5) in fresh output directories. Each gets a SIGKILL on the
Python task of one of its two nodes (drawn: rank 0's or rank 1's) in its first attempt, at a moment
of one of three kinds, labelled:

- ``training``: at a step drawn uniformly from the run's steps (from the first logged step to the
  one before the last), killed as soon as the run has logged it;
- ``start-up`` (``--startup`` of them): a moment drawn uniformly within the twin's start-up (from
  its job step's start to its first logged step), checked to come before the run's first step;
- ``checkpoint save`` (``--saves``): while a checkpoint is being written (a step directory
  without COMMITTED), after a step drawn like a training kill.

Every run must then complete by itself (the survivor records the run interrupted and requeues it),
log every step exactly once, and end with the twin's losses and final weights, bit for bit. Prints
one line per kill, then a Markdown table (kill, node, at step, resumed from, bitwise equal?);
``--out`` keeps them as JSON. Needs root and the cluster (slurm/local/start.sh); about two minutes
per kill on 2 cores (20 kills: 37 minutes at a load average of about 9); results in slurm/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
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
from nepa_scale.rundir import MARKER, RunDir  # noqa: E402

SETTINGS = {
    "model.overrides": {"dim": 48, "depth": 2, "num_heads": 2},
    "model.attention": "sdpa",
    "budget.global_batch": 32,
    "budget.images": 32 * STEPS,
    "deepspeed.zero_stage": 2,
    "optim.lr": 2e-3,
    "logging.log_every": 1,
    "logging.progress": "never",
    "checkpoint.every": 5,
    "distributed.timeout_s": 30,
}
POLL_S = 0.002


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


def wait(sweep, timeout: float = 900, poll: float = 1.0, settle: float = 60.0) -> RunStatus:
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


def job_id(sweep) -> str | None:
    launch_json = sweep.runs[0].run_dir / "launch.json"
    return json.loads(launch_json.read_text())["job_id"] if launch_json.is_file() else None


def step_started(sweep) -> bool:
    """The run's job has started its job step (srun launched the tasks)."""
    job = job_id(sweep)
    out = subprocess.run(["squeue", "-h", "-s", "-j", str(job), "-o", "%i"], capture_output=True, text=True)
    return job is not None and f"{job}.0" in out.stdout.split()


def job_nodes(sweep) -> list[str]:
    """The job's nodes in rank order (one task per node)."""
    nodelist = subprocess.run(
        ["squeue", "-h", "-j", job_id(sweep), "-o", "%N"], capture_output=True, text=True
    ).stdout.strip()
    return subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
    ).stdout.split()


def logged_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in RunDir(run_dir).read_metrics() if m.get("kind") == "train"]


def last_logged(run_dir: Path) -> int:
    last = RunDir(run_dir).last_metric("train")
    return last["step"] if last else 0


def saving(run_dir: Path) -> str | None:
    """A checkpoint being written now: a step directory without COMMITTED."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    return next((p.name for p in folder.glob("step_*") if p.is_dir() and not (p / MARKER).exists()), None)


def task_pid(node: str) -> int | None:
    """The run's Python task on ``node`` (not srun, whose command line names the task too: on the
    first node it is the job's batch step, and a dead srun ends the whole job)."""
    pids = subprocess.run(
        ["ip", "netns", "pids", f"nepa-{node}"], capture_output=True, text=True
    ).stdout.split()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in argv and "python" in Path(argv[0]).name:
            return int(pid)
    return None


def wait_for(condition, timeout: float = 600, poll: float = POLL_S):
    """``condition()``'s value once true; a condition that asks SLURM polls every 50 ms, not 2."""
    deadline = time.time() + timeout
    while not (value := condition()):
        if time.time() > deadline:
            raise TimeoutError("the run never reached the kill moment")
        time.sleep(poll)
    return value


def kill_at(sweep, kind: str, rng: random.Random, startup_s: float) -> dict:
    """Wait for a moment of ``kind`` (drawn with ``rng``) and SIGKILL a drawn rank's task; what it hit.
    The task is found first, so that the kill follows the moment within a poll (2 ms)."""
    run_dir = sweep.runs[0].run_dir
    rank, delay, target = rng.choice([0, 1]), rng.uniform(0, startup_s), rng.randint(1, STEPS - 1)
    wait_for(lambda: step_started(sweep), poll=0.05)
    started = time.time()
    node = job_nodes(sweep)[rank]
    pid = wait_for(lambda: task_pid(node), poll=0.05)
    if kind == "start-up":
        time.sleep(max(0.0, started + delay - time.time()))
    else:
        wait_for(lambda: last_logged(run_dir) >= target)
        if kind == "checkpoint save":
            wait_for(lambda: saving(run_dir) is not None or last_logged(run_dir) >= STEPS)
    os.kill(pid, signal.SIGKILL)
    # A checkpoint without COMMITTED now stays so: rank 0 commits only once every rank has saved.
    at_step, half_written = last_logged(run_dir), saving(run_dir)
    label = kind
    if kind == "start-up" and at_step > 0:
        label = "training (meant for start-up)"
    if kind == "checkpoint save" and half_written is None:
        label = "training (the save was over)"
    if kind == "training" and at_step >= STEPS:
        label = "after the last step"
    return {"kill": label, "node": node, "rank": rank, "at_step": at_step, "saving": half_written}


def outcome(run_dir: Path, twin: Path) -> dict:
    run = RunDir(run_dir)
    record = run.record()
    steps = logged_steps(run_dir)
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


def bitwise(result: dict) -> bool:
    return (
        result["status"] == "completed"
        and result["steps_once"]
        and result["losses_equal"]
        and result["weights_equal"]
    )


def table(results: list[dict]) -> str:
    lines = [
        "| # | kill | node (rank) | at step | resumed from | bitwise equal? |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        resumed = ", ".join(str(s) for s in r["resumed_from"])
        if not resumed:  # no restart recorded: from the start after a loss before the first commit
            resumed = "0 (the start)" if r["interruptions"] else "- (nothing to redo)"
        at = f"{r['at_step']}" + (f" ({r['saving']} half-written)" if r["saving"] else "")
        equal = "yes" if bitwise(r) else f"no ({r['status']})"
        lines.append(
            f"| {r['index']} | {r['kill']} | {r['node']} ({r['rank']}) | {at} | {resumed} | {equal} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--startup", type=int, default=3, help="kills during start-up")
    parser.add_argument("--saves", type=int, default=2, help="kills during a checkpoint save")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "slurm" / "local" / "start.sh")], check=True, capture_output=True)
    rng = random.Random(args.seed)
    kinds = ["start-up"] * args.startup + ["checkpoint save"] * args.saves
    kinds += ["training"] * (args.kills - len(kinds))
    rng.shuffle(kinds)
    folder = Path(tempfile.mkdtemp(prefix="random_kills_"))
    twin = launch(write_sweep(folder, "twin"))
    wait_for(lambda: step_started(twin), poll=0.05)
    started = time.time()
    wait_for(lambda: last_logged(twin.runs[0].run_dir) > 0)
    startup_s = time.time() - started
    row = wait(twin, poll=0.2)
    assert row.state == "completed", row.error
    print(f"twin: start-up {startup_s:.1f} s, then {STEPS} steps: {twin.runs[0].run_dir}", flush=True)
    results = []
    for i, kind in enumerate(kinds):
        sweep = launch(write_sweep(folder, f"kill{i}"))
        hit = kill_at(sweep, kind, rng, startup_s)
        wait(sweep)
        result = {"index": i, **hit, **outcome(sweep.runs[0].run_dir, twin.runs[0].run_dir)}
        results.append(result)
        print(json.dumps(result), flush=True)
    good = sum(bitwise(r) for r in results)
    mid = sum(r["kill"].startswith(("training", "checkpoint save")) for r in results)
    print(
        f"{good} of {len(results)} runs completed, every step logged once, bitwise equal to the twin; {mid} killed mid-training"
    )
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"settings": SETTINGS, "results": results}, indent=2))


if __name__ == "__main__":
    main()
