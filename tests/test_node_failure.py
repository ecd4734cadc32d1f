"""A node that dies, as a node losing power does, and its job coming back by itself.

On the local cluster (slurm/local/start.sh: partition multi, three namespace nodes) a 2-node run
loses one node: its slurmd and every process in its namespace are killed at once. SLURM marks the
node down after SlurmdTimeout and requeues the job (submitted ``--requeue``) onto the two nodes
left; the new incarnation's rank 0 takes the run's lock over from the dead one (the same job,
restarted) and resumes from the last committed checkpoint, with no `sweep launch`. The run ends
bitwise equal to its twin, which two local processes train meanwhile. The node comes back after
(a new slurmd, state resume), so the cluster is whole for what follows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from helpers import DIGITS_CONFIG, REPO, SMALL, env, final_weights, job_nodes, launch, losses, metrics

from nepa_scale.engine.checkpoint_store import committed_checkpoints
from nepa_scale.launch.sweep import load_sweep

DEADLINE_S = 600
STEPS = 40
SETTINGS = {
    **{key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in SMALL)},
    "budget.images": 32 * STEPS,
    "deepspeed.zero_stage": 2,
    "checkpoint.every": 5,
    "distributed.timeout_s": 30,
}


def wait_for(condition, what: str, timeout: float = DEADLINE_S):
    deadline = time.time() + timeout
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def node_state(node: str) -> str:
    return subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True
    ).stdout.strip()


def jobs_on(node: str) -> list[str]:
    return subprocess.run(
        ["squeue", "-h", "-w", node, "-o", "%i"], capture_output=True, text=True
    ).stdout.split()


def job_record(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def job_nodes_of(record: str) -> list[str]:
    """The nodes of ``scontrol show job``'s NodeList."""
    nodelist = next(part for part in record.split() if part.startswith("NodeList="))[len("NodeList=") :]
    return subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
    ).stdout.split()


def power_off(node: str) -> int:
    """Kill the node's slurmd and every process in its namespace at once (SIGKILL, by pid, until
    none is left). Returns how many processes were killed."""
    killed = 0
    while pids := subprocess.run(
        ["ip", "netns", "pids", f"nepa-{node}"], capture_output=True, text=True
    ).stdout.split():
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return killed


def power_on(node: str) -> None:
    """A new slurmd for the node (start.sh starts what is not running) and the node resumed."""
    subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], check=False, capture_output=True)
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    wait_for(lambda: node_state(node) == "idle", f"{node} to be idle again", 120)


def test_a_dead_nodes_job_is_requeued_by_slurm_and_resumes_bitwise(tmp_path):
    subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], check=True, capture_output=True)
    path = tmp_path / "node_failure.yaml"
    spec = {
        "name": "node_failure",
        "base": str(DIGITS_CONFIG),
        "set": SETTINGS,
        "profile": "local_multi",
        "output_root": str(tmp_path / "node_failure"),
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    (run,) = load_sweep(path).runs
    launched = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "sweep", "launch", str(path)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    twin_dir, twin_config = tmp_path / "twin", tmp_path / "twin.yaml"  # the same config, uninterrupted
    twin_config.write_text(yaml.safe_dump({**run.config_data, "output_dir": str(twin_dir)}))
    twin = launch(twin_dir, config=twin_config, nproc=2)

    run_dir = run.run_dir
    job = json.loads((run_dir / "launch.json").read_text())["job_id"]
    wait_for(
        lambda: len(metrics(run_dir)) >= 10 and committed_checkpoints(run_dir / "checkpoints"), "step 10"
    )
    nodes = job_nodes(run_dir)
    # Rank 0's node (the batch host, and the lock's owner), unless another job shares it.
    victim = wait_for(lambda: next((n for n in nodes if jobs_on(n) == [job]), None), "a node of its own")
    owner = json.loads((run_dir / ".owner.json").read_text())
    try:
        assert power_off(victim) >= 3  # slurmd, the batch step and the task at least
        killed_at = time.time()
        resume_step = committed_checkpoints(run_dir / "checkpoints")[-1].step  # what survives the kill
        wait_for(lambda: node_state(victim).startswith("down"), f"{victim} to be marked down", 120)
        down_after = time.time() - killed_at
        wait_for(lambda: "JobState=COMPLETED" in job_record(job), "the job to complete")
        record = job_record(job)
    finally:
        power_on(victim)
    assert down_after < 60, down_after  # SlurmdTimeout=15 s, pinged every 5 s
    # Requeued by SLURM itself (or at the survivor's request: the same requeue), restarted once, on
    # the two nodes left.
    assert "Requeue=1" in record and "Restarts=0" not in record, record
    assert victim not in job_nodes_of(record), record
    assert len(json.loads((run_dir / "launch.json").read_text())["jobs"]) == 1  # no new submission
    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["restarts"][-1]["from_step"] == resume_step
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))  # every step once
    folder = Path(json.loads((run_dir / "launch.json").read_text())["folder"])
    assert "#SBATCH --requeue" in (folder / f"{job}_submission.sh").read_text().splitlines()
    log = (folder / f"{job}_0_log.err").read_text()
    if victim == nodes[0]:  # the new rank 0 took the dead one's lock over
        assert f"took over the lock of train, pid {owner['pid']} on host {victim}, SLURM job {job}" in log
        assert "was requeued" in log
    for process in twin:
        _, err = process.communicate(timeout=DEADLINE_S)
        assert process.returncode == 0, err[-3000:]
    assert losses(run_dir) == losses(twin_dir)
    twin_weights, weights = final_weights(twin_dir), final_weights(run_dir)
    assert twin_weights.keys() == weights.keys()
    assert all(torch.equal(weights[k], twin_weights[k]) for k in weights)
