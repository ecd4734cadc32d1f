"""Sweeps on the real local SLURM cluster (slurm/local/start.sh) and through submitit's local executor.

Every job is submitted at the start (module fixture) so the runs overlap on the 2 cores; a watcher
thread sends the real interruptions (scancel --signal=USR2, scontrol requeue, SIGUSR2 to local
tasks) once a run is mid-way, and each test then waits for the outcome it checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import DIGITS_CONFIG, REPO, env, final_weights, job_nodes, losses, metrics

from nepa_scale.config import ConfigError
from nepa_scale.engine.checkpoint_store import committed_checkpoints
from nepa_scale.launch import launcher
from nepa_scale.launch.job import decide
from nepa_scale.launch.status import RunStatus, status_table, sweep_status
from nepa_scale.launch.sweep import load_sweep

DEADLINE_S = 600
BASE_SET = {
    "model.overrides": {"dim": 48, "depth": 2, "num_heads": 2},
    "model.attention": "sdpa",
    "budget.global_batch": 32,
    "budget.images": 9600,  # 300 steps
    "deepspeed.zero_stage": 0,
    "optim.lr": 2e-3,
    "logging.log_every": 5,
    "logging.eval_batches": 1,
    "logging.progress": "never",
    "checkpoint.every": 20,
}
INTERRUPT_AT = 60  # steps
# The runs across nodes: ZeRO-2 over gloo between two nodes, a checkpoint every step (a
# lost node's task dies during a save), a collective gives up after 30 s.
MULTI = {
    "deepspeed.zero_stage": 2,
    "optim.schedule": "wsd",
    "optim.warmup_steps": 5,
    "optim.cooldown_fraction": 0.25,
    "logging.log_every": 1,
    "checkpoint.every": 1,
    "checkpoint.keep_every": 10,
    "distributed.timeout_s": 30,
}


def write_sweep(directory: Path, name: str, profile: str, resources=None, axes=None, **extra_set) -> Path:
    spec = {
        "name": name,
        "base": str(DIGITS_CONFIG),
        "set": {**BASE_SET, **extra_set},
        "axes": axes or [],
        "profile": profile,
        "resources": resources or {},
        "output_root": str(directory / name),
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", *args], capture_output=True, text=True, env=env(), cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"nepa-scale {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def last_step(run_dir: Path) -> int:
    train = metrics(run_dir)
    return train[-1]["step"] if train else 0


def job_step_started(run_dir: Path) -> bool:
    """The run's SLURM job has started its job step (srun launched the task)."""
    launch_json = run_dir / "launch.json"
    if not launch_json.is_file():
        return False
    job = json.loads(launch_json.read_text())["job_id"]
    steps = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i"], capture_output=True, text=True)
    return f"{job}.0" in steps.stdout.split()


def mid_run(run_dir: Path) -> bool:
    """The run has logged INTERRUPT_AT steps and committed a checkpoint."""
    return last_step(run_dir) >= INTERRUPT_AT and bool(list((run_dir / "checkpoints").glob("*/COMMITTED")))


def resumed_past(step: int, restarts: int = 1, key: str = "restarts"):
    """Due once run.json lists ``restarts`` entries under ``key`` (resumes; ``interruptions``: stops,
    a stop before the first step saves nothing and so resumes nothing) and the log reached ``step``."""

    def due(run_dir: Path) -> bool:
        path = run_dir / "run.json"
        done = json.loads(path.read_text()).get(key, []) if path.is_file() else []
        return len(done) >= restarts and last_step(run_dir) >= step

    return due


class Watcher:
    """One thread per target: once ``due(run_dir)`` holds (after ``delay`` seconds more), it sends
    the target's interruption, a command with {job} for the run's job id or a callable in this process
    (no interpreter start-up before the signal), and remembers when and at which step (threads, so
    that no slow command delays another run's signal)."""

    def __init__(self, targets: list[tuple]):
        self.sent: dict[str, tuple[float, int]] = {}
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=t, daemon=True) for t in targets]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _watch(self, name: str, run_dir: Path, command, due=mid_run, delay: float = 0.0) -> None:
        while not self.stop.is_set():
            if due(run_dir):
                time.sleep(delay)
                step = last_step(run_dir)
                if callable(command):
                    try:
                        command()
                        self.sent[name] = (time.time(), step)
                    except Exception as exc:  # noqa: BLE001 - reported by the test that waits for it
                        self.errors.append(f"{name}: {exc}")
                    return
                job = json.loads((run_dir / "launch.json").read_text())["job_id"]
                argv = [part.replace("{job}", job) for part in command]
                result = subprocess.run(argv, capture_output=True, text=True, env=env(), cwd=REPO)
                if result.returncode:
                    self.errors.append(f"{argv}: {result.stdout} {result.stderr}")
                else:
                    self.sent[name] = (time.time(), step)
                return
            time.sleep(0.05)


def kill_node_task(rank: int, run_dir: Path, within_save_s: float = 5.0) -> dict:
    """SIGKILL the run's task of ``rank`` (one per node: its namespace node's, as if the node died),
    during a checkpoint save when one comes within ``within_save_s``: a step directory without
    COMMITTED. Returns the step of the newest committed checkpoint at the kill and the half-written
    one, if any."""
    node = job_nodes(run_dir)[rank]
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + within_save_s
    half = None
    while time.time() < deadline:
        committed = {p.parent.name for p in ckpts.glob("*/COMMITTED")}
        writing = [p for p in ckpts.glob("step_*") if p.is_dir() and p.name not in committed]
        if writing:
            half = writing[0].name
            break
        time.sleep(0.002)
    pids = subprocess.run(
        ["ip", "netns", "pids", f"nepa-{node}"], capture_output=True, text=True
    ).stdout.split()
    tasks = []  # its Python task, not an srun whose command line names it too
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        if "submitit.core._submit" in argv and "python" in Path(argv[0]).name:
            tasks.append(pid)
    assert tasks, f"no task of {run_dir.name} on {node}"
    for pid in tasks:
        subprocess.run(["kill", "-9", pid], check=False)
    newest = max((int(name[5:13]) for name in {p.parent.name for p in ckpts.glob("*/COMMITTED")}), default=0)
    return {"committed": newest, "half_written": half, "time": time.time()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], check=True, capture_output=True)
    root = tmp_path_factory.mktemp("launch")
    sweeps = {
        # A time limit (1 min, notice 30 s before) shorter than the run's work. SLURM sends the
        # notice at its 30-s time-limit check, up to 60 s early: here at the first check after the
        # job starts, 0-30 s in. Start-up takes about 7 s on an idle machine, so an attempt trains
        # at most ~23 s (~1100 steps at this machine kind's ~46 steps/s); while the other jobs start
        # it may train none. Many requeues allowed: a slow machine needs them.
        "timeout": write_sweep(
            root,
            "timeout",
            "local",
            {"time_min": 1, "signal_delay_s": 30, "max_requeues": 30, "mem_gb": 2},
            **{"budget.images": 48000},  # 1500 steps: more than one attempt's worth on any machine
        ),
        "sweep": write_sweep(
            root,
            "sweep",
            "local",
            {"mem_gb": 2},
            axes=[{"zip": {"seed": [0, 1, 2, 3], "optim.warmup_fraction": [0.05, 0.05, 0.05, 2.0]}}],
        ),
        "local": write_sweep(root, "local", "cpu", **{"seed": 0, "optim.warmup_fraction": 0.05}),
        # A notice while the job is still starting (bug: it died of SIGUSR2 as FAILED).
        "start_notice": write_sweep(root, "start_notice", "local", {"mem_gb": 2}, **{"budget.images": 1920}),
        # Notices while children run: a loader worker started with spawn (it used to die of the
        # notice, and the run failed), first while the job starts, then mid-epoch.
        "children": write_sweep(
            root,
            "children",
            "local",
            {"mem_gb": 2},
            **{"budget.images": 3200, "data.num_workers": 1, "data.worker_start": "spawn"},  # 100 steps
        ),
        # Across the namespace nodes (partition multi, 2 nodes x 1 task, ZeRO-2 over gloo): a WSD
        # trunk (60 steps; its 40-step budget branches at step 30), preempted on both nodes, then a
        # node's task killed while it saves (a checkpoint every step); its uninterrupted twin; and a
        # job array of one-node runs, one per node.
        **{
            name: write_sweep(root, name, "local_multi", axes=axes, **MULTI)
            for name, axes in (
                ("multi", [{"grid": {"budget.images": [1280, 1920]}}]),
                ("multi_twin", [{"grid": {"budget.images": [1920]}}]),
            )
        },
        "spread": write_sweep(
            root, "spread", "local_multi", {"nodes": 1}, axes=[{"seeds": 2}], **{"budget.images": 640}
        ),
    }
    loaded = {name: load_sweep(path) for name, path in sweeps.items()}
    seed0 = loaded["sweep"].runs[0]
    trunk = loaded["multi"].runs[1]
    killed: dict = {}
    watcher = Watcher(
        [
            # An array task: through `sweep preempt`'s code, which stops scancel's retries (slurm/README.md).
            ("usr2", seed0.run_dir, lambda: launcher.preempt(loaded["sweep"], seed0.run_id)),
            ("requeue", loaded["sweep"].runs[1].run_dir, ["scontrol", "requeue", "{job}"]),
            (
                "start",
                loaded["start_notice"].runs[0].run_dir,
                ["scancel", "--signal=USR2", "{job}"],
                job_step_started,
                0.5,
            ),
            (
                "children_start",
                loaded["children"].runs[0].run_dir,
                ["scancel", "--signal=USR2", "{job}"],
                job_step_started,
                0.5,
            ),
            (
                "children_mid",
                loaded["children"].runs[0].run_dir,
                ["scancel", "--signal=USR2", "{job}"],
                resumed_past(10, key="interruptions"),
            ),
            (
                "multi_usr2",
                trunk.run_dir,
                lambda: launcher.preempt(loaded["multi"], trunk.run_id),
                resumed_past(12, 0),
            ),
            (
                "multi_kill",
                trunk.run_dir,
                lambda: killed.update(kill_node_task(1, trunk.run_dir)),
                resumed_past(40),
            ),
            (
                "local",
                loaded["local"].runs[0].run_dir,
                [
                    sys.executable,
                    "-m",
                    "nepa_scale.cli",
                    "sweep",
                    "preempt",
                    str(sweeps["local"]),
                    "--run",
                    loaded["local"].runs[0].run_id,
                ],
            ),
        ]
    )
    watcher.start()  # before the launches: the start-up notice must not miss its job's start
    # "spread" before the 2-node runs: its two tasks start at once on two of the three free nodes.
    for name in ("start_notice", "spread", "multi", "multi_twin", "children", "timeout", "sweep"):
        cli("sweep", "launch", str(sweeps[name]), check=name != "sweep")  # "sweep" holds an invalid run
    local = subprocess.Popen(
        [sys.executable, "-m", "nepa_scale.cli", "sweep", "launch", str(sweeps["local"])],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The uninterrupted twin of seed 0: the same resolved config, plain `nepa-scale train`.
    twin_dir = root / "twin"
    twin_config = root / "twin.yaml"
    twin_config.write_text(yaml.safe_dump({**seed0.config_data, "output_dir": str(twin_dir)}))
    twin = subprocess.Popen(
        [sys.executable, "-m", "nepa_scale.cli", "train", str(twin_config)],
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield {
        "sweeps": sweeps,
        "loaded": loaded,
        "local": local,
        "twin": twin,
        "twin_dir": twin_dir,
        "watcher": watcher,
        "killed": killed,
    }
    watcher.stop.set()
    for name in ("start_notice", "multi", "multi_twin", "spread", "children", "timeout", "sweep"):
        launcher.cancel(loaded[name])
    for process in (local, twin):
        if process.poll() is None:
            process.kill()


def wait_done(sweep, timeout: float = DEADLINE_S) -> list[RunStatus]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = sweep_status(sweep)
        if not any(r.state in ("pending", "running", "requeued", "not launched", "waiting") for r in rows):
            return rows
        time.sleep(1)
    raise AssertionError("sweep did not finish:\n" + status_table(sweep_status(sweep)))


def wait_twin(study) -> Path:
    _, err = study["twin"].communicate(timeout=DEADLINE_S)
    assert study["twin"].returncode == 0, err[-2000:]
    return study["twin_dir"]


def assert_same_run(run_dir: Path, twin_dir: Path) -> None:
    ours, theirs = losses(run_dir), losses(twin_dir)
    assert sorted(ours) == sorted(theirs) and ours
    assert ours == theirs
    for name, tensor in final_weights(twin_dir).items():
        assert torch.equal(final_weights(run_dir)[name], tensor), name


def run_info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# ----------------------------------------------------------------------------- on SLURM


def test_sweep_completes_skips_on_relaunch_and_reports_invalid_run(study):
    sweep = study["loaded"]["sweep"]
    rows = wait_done(sweep)
    assert [r.state for r in rows] == ["completed", "completed", "completed", "failed"]
    assert "optim.warmup_fraction" in rows[3].error
    status = cli("sweep", "status", str(study["sweeps"]["sweep"]), check=False)
    assert status.returncode == 1 and "error: optim.warmup_fraction" in status.stdout
    again = cli("sweep", "launch", str(study["sweeps"]["sweep"]), check=False)
    assert again.returncode == 1 and again.stdout.startswith("submitted 0 of 4 runs")
    assert (
        f"not submitted: {rows[3].run_id}: failed, its config is invalid (optim.warmup_fraction"
        in again.stdout
    )
    # The job ran the code snapshot taken at submission.
    launch_info = json.loads((sweep.runs[2].run_dir / "launch.json").read_text())
    assert (Path(launch_info["code"]) / "nepa_scale" / "launch" / "job.py").is_file()
    assert run_info(sweep.runs[2].run_dir)["code"] == str(Path(launch_info["code"]) / "nepa_scale")


def test_usr2_preemption_requeues_and_matches_uninterrupted_twin(study):
    run = study["loaded"]["sweep"].runs[0]
    wait_done(study["loaded"]["sweep"])
    info = run_info(run.run_dir)
    assert "usr2" in study["watcher"].sent, study["watcher"].errors
    assert [e["kind"] for e in info["interruptions"]] == ["preemption"]
    assert len(info["restarts"]) == 1 and info["restarts"][0]["from_step"] >= INTERRUPT_AT
    assert_same_run(run.run_dir, wait_twin(study))


def test_scontrol_requeue_resumes_from_last_committed_checkpoint(study):
    run = study["loaded"]["sweep"].runs[1]
    wait_done(study["loaded"]["sweep"])
    info = run_info(run.run_dir)
    assert "requeue" in study["watcher"].sent, study["watcher"].errors
    assert info["status"] == "completed" and info["step"] == info["total_steps"] == 300
    assert len(info["restarts"]) == 1
    resumed = info["restarts"][0]["from_step"]
    # From a committed checkpoint: a periodic one, or the save the SIGTERM allowed before the kill,
    # never past the step the job had reached when the signal came (recorded by the job; the
    # watcher's last logged step can trail it by several steps on a busy machine).
    (termination,) = [e for e in info["interruptions"] if e["kind"] == "termination"]
    assert study["watcher"].sent["requeue"][1] <= termination["step"]
    assert 20 <= resumed <= termination["step"]
    steps = [m["step"] for m in metrics(run.run_dir)]
    assert steps == list(range(5, 301, 5))  # every logged step exactly once: nothing lost, nothing doubled


def test_time_limit_requeues_until_the_budget_is_done(study):
    sweep = study["loaded"]["timeout"]
    (row,) = wait_done(sweep, timeout=2 * DEADLINE_S)  # a slow machine needs many attempts
    info = run_info(sweep.runs[0].run_dir)
    assert row.state == "completed", row.error
    assert info["timeouts"] >= 1 and info["step"] == info["total_steps"] == 1500
    assert {e["kind"] for e in info["interruptions"]} == {"timeout"}
    # Every attempt's progress is recorded; those that trained no step saved nothing.
    assert all(e["steps_done"] >= 0 for e in info["interruptions"])
    resumed_from = [r["from_step"] for r in info["restarts"]]
    assert resumed_from == sorted(resumed_from) and 0 not in resumed_from


def test_a_notice_while_the_job_starts_ends_in_a_requeue(study):
    """Clusters send notices at any moment, seconds after a job starts too. Before any handler
    exists SIGUSR2 would end the process (sacct: FAILED 0:12); the job's python blocks the notices
    until the engine's flag is installed, which then stops before the first step and requeues."""
    sweep = study["loaded"]["start_notice"]
    (row,) = wait_done(sweep)
    info = run_info(sweep.runs[0].run_dir)
    assert "start" in study["watcher"].sent, study["watcher"].errors
    assert row.state == "completed", row.error
    (notice,) = info["interruptions"]
    assert notice["kind"] == "preemption" and notice["action"] == "requeue" and notice["steps_done"] == 0
    assert notice["step"] == 0 and info["step"] == info["total_steps"] == 60


def test_runs_with_the_same_resources_go_in_as_one_job_array(study):
    sweep = study["loaded"]["sweep"]
    wait_done(sweep)
    jobs = [json.loads((run.run_dir / "launch.json").read_text())["job_id"] for run in sweep.runs[:3]]
    arrays = {job.split("_")[0] for job in jobs}
    assert len(arrays) == 1 and sorted(job.split("_")[1] for job in jobs) == ["0", "1", "2"], jobs
    # The preempted (USR2) and requeued (scontrol requeue) runs were tasks of that array.
    states = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", arrays.pop(), "-o", "JobID,State"], capture_output=True, text=True
    ).stdout.split()
    assert {line.split("|")[0] for line in states} == set(jobs)


def task_logs(run_dir: Path) -> dict[str, str]:
    """Every log of the run's jobs, by file name (one per task of each job: {job}_{task}_log.err)."""
    launch = json.loads((run_dir / "launch.json").read_text())
    folder = Path(launch["folder"])
    return {p.name: p.read_text(errors="replace") for p in folder.glob(f"{launch['job_id']}_*_log.err")}


def test_a_run_across_two_nodes_survives_a_notice_and_a_lost_node_bitwise(study):
    """2 nodes x 1 task, ZeRO-2 over gloo between the nodes' addresses: a notice (scancel USR2)
    reaches both nodes, all save and requeue; later rank 1's task is SIGKILLed while it saves. The
    survivor does not wait for a time limit: it fails within seconds, records the run interrupted at
    its last committed checkpoint and requeues it. The resumed run equals its uninterrupted twin,
    losses and final weights bitwise; the trunk submitted its branch once, from one rank."""
    sweep, twin = study["loaded"]["multi"], study["loaded"]["multi_twin"]
    rows = wait_done(sweep)
    (twin_row,) = wait_done(twin)
    sent, killed = study["watcher"].sent, study["killed"]
    assert {"multi_usr2", "multi_kill"} <= set(sent), study["watcher"].errors
    assert [(r.design, r.state) for r in rows] == [("branch@30", "completed"), ("trunk", "completed")], [
        r.error for r in rows
    ]
    assert twin_row.state == "completed", twin_row.error
    trunk = sweep.runs[1]
    info = run_info(trunk.run_dir)
    assert info["world_size"] == 2 and info["status"] == "completed" and info["error"] is None
    notice, lost = info["interruptions"]
    assert notice["kind"] == "preemption" and notice["action"] == "requeue"
    assert lost["kind"] == "peer_lost" and lost["action"] == "requeue"
    assert lost["signal_unix_time"] - killed["time"] < 30  # seconds, not the time limit
    assert [r["from_step"] for r in info["restarts"]] == [notice["step"], lost["step"]]
    if killed["half_written"]:  # caught mid-save: rank 0 commits only after every rank has saved
        assert lost["step"] <= int(killed["half_written"][5:13])  # so a resume used it only if complete
    assert_same_run(trunk.run_dir, twin.runs[0].run_dir)
    logs = task_logs(trunk.run_dir)
    assert sum("received SIGUSR2" in text for text in logs.values()) >= 2, list(logs)  # both nodes
    submitted = [
        line for text in logs.values() for line in text.splitlines() if "submitted cooldown branch" in line
    ]
    assert len(submitted) == 1, submitted
    branch = sweep.runs[0]
    assert len(json.loads((branch.run_dir / "launch.json").read_text())["jobs"]) == 1
    assert run_info(branch.run_dir)["branch"]["step"] == 30


def test_a_two_node_run_resumes_on_one_node_through_a_universal_checkpoint(study, tmp_path):
    sweep = study["loaded"]["multi"]
    wait_done(sweep)
    run_dir = tmp_path / "one_node"
    shutil.copytree(sweep.runs[1].run_dir, run_dir)
    for ckpt in committed_checkpoints(run_dir / "checkpoints"):
        if ckpt.step > 20:  # keep_every=10 kept 10 and 20: the run lost everything after step 20
            shutil.rmtree(ckpt.path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nepa_scale.cli",
            "train",
            str(run_dir / "config.yaml"),
            f"output_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "universal" in done.stderr
    restart = run_info(run_dir)["restarts"][-1]
    assert restart["from_step"] == 20 and restart["world_size"] == 1
    before, after = losses(sweep.runs[1].run_dir), losses(run_dir)
    assert sorted(after) == sorted(before) and all(after[s] == before[s] for s in range(1, 21))
    assert max(abs(after[s] - before[s]) for s in range(21, 61)) < 1e-5  # one rank sums in another order


def test_a_job_array_lands_on_different_nodes(study):
    sweep = study["loaded"]["spread"]
    rows = wait_done(sweep)
    assert [r.state for r in rows] == ["completed", "completed"], [r.error for r in rows]
    jobs = [json.loads((run.run_dir / "launch.json").read_text())["job_id"] for run in sweep.runs]
    assert len({job.split("_")[0] for job in jobs}) == 1, jobs
    nodes = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", ",".join(jobs), "-o", "JobID,NodeList"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert len({line.split("|")[1] for line in nodes}) == 2, nodes


def test_notices_while_children_run_end_in_requeues(study):
    """The notice reaches every process of the job step; a loader worker started with spawn ignores
    it (the notices stay blocked in it), so the run saves and requeues instead of failing: once while
    the job starts, once mid-epoch with the worker running."""
    sweep = study["loaded"]["children"]
    (row,) = wait_done(sweep)
    sent = study["watcher"].sent
    assert {"children_start", "children_mid"} <= set(sent), study["watcher"].errors
    info = run_info(sweep.runs[0].run_dir)
    assert row.state == "completed" and info["error"] is None, row.error
    assert [e["kind"] for e in info["interruptions"]] == ["preemption", "preemption"]
    assert info["interruptions"][0]["steps_done"] == 0 and info["interruptions"][1]["steps_done"] > 0
    assert not any(
        "worker" in text and "killed" in text for text in task_logs(sweep.runs[0].run_dir).values()
    )


def test_sweep_cancel_cancels_a_job_array(study, tmp_path):
    path = write_sweep(
        tmp_path, "cancel", "local", {"mem_gb": 2}, axes=[{"seeds": 2}], **{"budget.images": 96000}
    )
    sweep = load_sweep(path)
    cli("sweep", "launch", str(path))
    deadline = time.time() + DEADLINE_S
    while time.time() < deadline and not any(r.state == "running" for r in sweep_status(sweep)):
        time.sleep(0.5)
    jobs = [json.loads((run.run_dir / "launch.json").read_text())["job_id"] for run in sweep.runs]
    assert len({job.split("_")[0] for job in jobs}) == 1 and all("_" in job for job in jobs), jobs
    result = cli("sweep", "cancel", str(path))
    assert result.stdout.startswith("cancelled 2 runs"), result.stdout
    rows = wait_done(sweep)
    assert [r.state for r in rows] == ["cancelled", "cancelled"], status_table(rows)
    status = cli("sweep", "status", str(path), check=False).stdout
    for row in rows:  # what was left undone: where each resumes from, and the command
        start = (
            f"its checkpoint of step {row.committed}"
            if row.committed is not None
            else "the start (nothing committed)"
        )
        assert (
            f"{row.run_id}: cancelled; resumes from {start} with: nepa-scale sweep launch {path}" in status
        ), status


# ----------------------------------------------------------------------------- local executor


def test_local_executor_preemption_matches_uninterrupted_twin(study):
    out, _ = study["local"].communicate(timeout=DEADLINE_S)
    assert study["local"].returncode == 0, out[-3000:]
    run = study["loaded"]["local"].runs[0]
    info = run_info(run.run_dir)
    assert "local" in study["watcher"].sent, study["watcher"].errors
    assert info["status"] == "completed" and len(info["restarts"]) == 1
    assert info["code"].startswith(str(run.run_dir.parent / ".code"))  # the snapshot, not the checkout
    assert_same_run(run.run_dir, wait_twin(study))


# ----------------------------------------------------------------------------- no cluster needed


def test_timeout_requeues_count_against_the_profile_maximum():
    assert decide("SIGUSR2", 3600, 90, timeouts=0, max_requeues=0).action == "requeue"  # preemption
    assert decide("SIGUSR2", 90, 90, timeouts=2, max_requeues=3) == decide("SIGUSR2", 60, 90, 0, 3)
    assert decide("SIGUSR2", 90, 90, timeouts=2, max_requeues=3).kind == "timeout"
    give_up = decide("SIGUSR2", 80, 90, timeouts=3, max_requeues=3)
    assert give_up.action == "give_up" and "max_requeues=3" in give_up.reason
    assert decide("SIGTERM", 10, 90, timeouts=0, max_requeues=3).action == "exit"


def test_run_ids_are_stable_and_local_to_the_changed_run(tmp_path):
    axes = [{"grid": {"model.overrides.dim": [32, 64]}}, {"zip": {"seed": [0, 1], "optim.lr": [1e-3, 2e-3]}}]
    first = load_sweep(write_sweep(tmp_path, "a", "cpu", axes=axes))
    again = load_sweep(write_sweep(tmp_path, "a", "cpu", axes=axes))
    assert [r.run_id for r in first.runs] == [r.run_id for r in again.runs] and len(first.runs) == 4
    assert first.runs[0].run_id.startswith("dim32_seed0_lr0.001-")
    changed = [
        {"grid": {"model.overrides.dim": [32, 64]}},
        {"zip": {"seed": [0, 1], "optim.lr": [1e-3, 3e-3]}},
    ]
    other = load_sweep(write_sweep(tmp_path, "a", "cpu", axes=changed))
    same = [a.run_id == b.run_id for a, b in zip(first.runs, other.runs, strict=True)]
    assert same == [True, False, True, False]
    # Resources do not change what a run computes, so not its id either.
    roomier = load_sweep(write_sweep(tmp_path, "a", "cpu", {"time_min": 999}, axes=axes))
    assert [r.run_id for r in roomier.runs] == [r.run_id for r in first.runs]


def test_the_demo_keeps_the_run_ids_earlier_versions_gave_it(tmp_path):
    """A setting or section added to the run config, or one retired, must not rename the runs of a
    study under way (LATER_SETTINGS, RETIRED_SETTINGS): the three-width demo as it was before the
    online probes (recorded before segmentation's section existed), and as it was before the probe's
    cross-validation (logging.probe_folds), keep their ids; today's ladder has its own."""
    spec = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    spec["base"] = str(REPO / "configs" / "digits_tiny.yaml")
    del spec["set"]["logging.probe_folds"]  # the three-width demo of 2026-12-06
    spec["set"].update({"logging.eval_every": 150, "logging.probe_every": 150})
    spec["axes"] = [
        {"zip": {"model.overrides.dim": [16, 32, 64], "model.overrides.num_heads": [1, 2, 4]}},
        {"grid": {"budget.images": [19200, 38400, 76800, 153600]}},
        {"seeds": 2},
    ]
    three_widths = tmp_path / "demo_three_widths.yaml"
    three_widths.write_text(yaml.safe_dump(spec))
    del spec["set"]["logging.probe_every"]
    spec["set"]["logging.eval_every"] = 0
    before = tmp_path / "demo_before_probes.yaml"
    before.write_text(yaml.safe_dump(spec))
    assert [r.run_id for r in load_sweep(before).runs[:3]] == [
        "dim16_num_heads1_images19.2k_seed0-8b40493e",
        "dim16_num_heads1_images19.2k_seed1-d06b2aac",
        "dim16_num_heads1_images38.4k_seed0-fdbbdfa1",
    ]
    assert [r.run_id for r in load_sweep(three_widths).runs[:3]] == [
        "dim16_num_heads1_images19.2k_seed0-7ccf1e8f",
        "dim16_num_heads1_images19.2k_seed1-1557a853",
        "dim16_num_heads1_images38.4k_seed0-d47de722",
    ]
    assert [r.run_id for r in load_sweep(REPO / "sweeps" / "demo.yaml").runs[:3]] == [
        "dim16_num_heads1_images12.8k_seed0-b447b0d1",
        "dim16_num_heads1_images12.8k_seed1-c3a1b22a",
        "dim16_num_heads1_images25.6k_seed0-5982b77e",
    ]


def test_step_time_counts_ring_traffic_and_hides_all_but_the_last_bucket():
    """nccl-tests' bus convention; with overlap_comm, buckets fill evenly through backward and only
    the last one waits for its end, unless the network is slower than backward."""
    from nepa_scale.comm import ALL_REDUCE, Collective, step_time

    grads = Collective(ALL_REDUCE, "gradients", 0.25e9, buckets=4, rounds=1, overlappable=True)
    assert grads.bus_bytes(16) == pytest.approx(2 * 15 / 16 * 1e9)
    wire = 2 * 15 / 16 * 1e9 / 40e9  # 46.9 ms at 40 GB/s
    timing = dict(compute_s=0.3, backward_s=0.2, accumulation=1, bus_gbps=40, latency_s=0.0)
    alone = step_time([grads], 16, **timing, overlap_comm=False)
    assert alone.exposed_s == pytest.approx(wire) and alone.efficiency == pytest.approx(0.3 / (0.3 + wire))
    hidden = step_time([grads], 16, **timing, overlap_comm=True)
    assert hidden.exposed_s == pytest.approx(wire / 4) and hidden.comm_s == pytest.approx(wire)
    slow_network = step_time([grads], 16, **{**timing, "bus_gbps": 4}, overlap_comm=True)
    assert slow_network.exposed_s == pytest.approx(10 * wire - 0.2 * 3 / 4)  # backward hides 150 ms of it


def test_sweep_plan_predicts_step_time_and_scaling_efficiency_from_the_bench_and_the_network(
    tmp_path, capsys
):
    """B/14 at batch 4096 on 8, 64 and 512 H100s (sweeps/scale_out_h100.yaml): one device's step is
    the profile's measured bench case (compiled blocks, like the runs) scaled to the run's images
    per GPU, the communication is DeepSpeed's per ZeRO stage at the profile's bandwidths, and
    efficiency falls with scale. Runs the planner cannot cost get an INVALID row, not a crash."""
    from nepa_scale.cli import main
    from nepa_scale.launch.plan import plan_run

    path = REPO / "sweeps" / "scale_out_h100.yaml"
    sweep = load_sweep(path)
    plans = {
        (run.resources.nodes, run.config.deepspeed.zero_stage): plan_run(run)
        for run in sweep.runs
        if run.config.model.name == "nepa_b14"
    }
    assert len(plans) == 9 and not any(p.error for p in plans.values())
    bench = json.loads((REPO / "docs/results/h100-2026-11-27/bench_after_overflow_fix.json").read_text())
    (case,) = [c for c in bench["results"] if c["model"] == "nepa_b14"]
    ms = case["phase_ms"]
    per_image = (ms["data"] + ms["forward"] + ms["backward"]) / case["micro_batch"]
    for nodes, images in ((1, 512), (8, 64), (64, 8)):
        expected = (images * per_image + ms["optimizer"]) / 1e3
        assert plans[nodes, 2].timing.compute_s == pytest.approx(expected)
        assert "nepa_b14 b256 z2 compile=blocks" in plans[nodes, 2].compute_source
    # ZeRO-1 on 512 GPUs: a bf16 all-reduce of the gradients and an all-gather of the parameters,
    # both after backward, at the profile's 40 GB/s per GPU and 30 us per call.
    n, size = 512, 2 * plans[64, 1].params
    wire = (2 * (n - 1) / n * size + (n - 1) / n * size) / 40e9
    assert plans[64, 1].timing.exposed_s == pytest.approx(wire + 2 * 30e-6)
    for stage in (1, 2, 3):
        efficiency = [plans[nodes, stage].timing.efficiency for nodes in (1, 8, 64)]
        assert 0.95 < efficiency[0] <= 1 and efficiency[0] > efficiency[1] > efficiency[2], efficiency
    # Eager runs have no eager bench case: the profile's TFLOP/s.
    (eager,) = [
        r for r in load_sweep(path, overrides=["model.compile=none"]).runs if r.run_id == sweep.runs[0].run_id
    ] or [None]
    assert eager is None or "300 TFLOP/s" in plan_run(eager).compute_source
    assert main(["sweep", "plan", str(path), "--comm"]) == 0
    out = capsys.readouterr().out
    assert "step s" in out and "eff" in out and out.count("reduce_scatter_tensor  gradients") == 9
    assert "measured by bench for 18 of 27 runs, else 300 TFLOP/s" in out  # H/14 has no bench case
    # A setting DeepSpeed refuses, or an epochs budget without its data: one INVALID row per run.
    paper = str(REPO / "sweeps" / "paper_b14.yaml")
    typo = "deepspeed.extra.zero_optimization.overlap_com=true"
    assert main(["sweep", "plan", paper, "--set", "budget.epochs=null", "budget.images=4096000", typo]) == 1
    assert "INVALID: deepspeed: DeepSpeed refuses zero_optimization" in capsys.readouterr().out
    assert main(["sweep", "plan", paper, "--set", f"data.root={tmp_path}"]) == 1
    assert "INVALID: data:" in capsys.readouterr().out


def test_sweep_plan_takes_every_set_and_checkpoints_what_the_profile_memory_needs(tmp_path, capsys):
    """Repeated --set all apply (earlier ones were silently dropped); grad_checkpointing=auto is resolved
    per run against the profile's device memory, as the trainer does on the device; a run invalid
    for its world size shows as INVALID (it used to get a plan row while the exit code said failed)."""
    from nepa_scale.cli import main

    (tmp_path / "train").mkdir()
    sweep = str(REPO / "sweeps" / "scaling_imagenet.yaml")
    sets = ["--set", f"data.root={tmp_path}", "--set", "model.grad_checkpointing=auto"]
    sets += ["--set", "resources.device_memory_gb=24", "--set", "budget.micro_batch=64"]
    assert main(["sweep", "plan", sweep, *sets]) == 0
    rows = {
        line.split()[1]: line.split()
        for line in capsys.readouterr().out.splitlines()
        if "_images12.8M-" in line
    }
    checkpointed = {model: int(row[8]) for model, row in rows.items()}  # the ckpt column
    assert checkpointed == {"nepa_s14": 0, "nepa_b14": 0, "nepa_l14": 0, "nepa_h14": checkpointed["nepa_h14"]}
    assert 0 < checkpointed["nepa_h14"] < 32
    assert all(float(row[7]) <= 0.9 * 24 for row in rows.values())  # mem GB
    assert main(["sweep", "plan", sweep, *sets, "--set", "budget.micro_batch=512"]) == 1
    out = capsys.readouterr().out
    invalid = [line.split(maxsplit=2) for line in out.splitlines() if "INVALID" in line]
    assert [(model, rest) for _, model, rest in invalid if model == "nepa_b14"][0][1] == (
        "INVALID: budget.global_batch: 4096 is not divisible by world size 16 x micro_batch 512"
    )


def test_bad_sweeps_fail_with_one_line_naming_the_key(tmp_path):
    path = write_sweep(tmp_path, "bad", "cpu")
    spec = yaml.safe_load(path.read_text())
    for change, message in (
        ({"axes": [{"grid": {"seed": 3}}]}, "axes[0].grid.seed: expected a non-empty list"),
        (
            {"axes": [{"zip": {"seed": [0, 1], "optim.lr": [1e-3]}}]},
            "axes[0].zip: lists must have equal lengths",
        ),
        ({"profile": "nowhere"}, "profile: 'nowhere'"),
        ({"resources": {"gpus_per_node": 8, "tasks_per_node": 1}}, "tasks_per_node: one task per GPU"),
        ({"resources": {"inter_node_gbps": 0}}, "inter_node_gbps: must be > 0, got 0"),
        (
            {"resources": {"bench_results": ["gone.json"]}},
            f"bench_results: no such file {tmp_path}/gone.json",
        ),
        ({"resouces": {}}, "unknown key 'resouces'"),
    ):
        path.write_text(yaml.safe_dump({**spec, **change}))
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_sweep(path)


def test_memory_model_matches_the_measured_h100_peaks():
    """Peaks measured on one H100 in bf16 (docs/performance.md): eager blocks with `nepa-scale train`
    under ZeRO-2 (2026-11-26), compiled blocks with `nepa-scale bench` under ZeRO 0-2 (2026-11-27).
    The issue asks for 10%; the model is within 6% of every one."""
    from nepa_scale.memory import estimate_memory
    from nepa_scale.models.zoo import count_params, get_arch

    for name, micro, zero_stage, compiled, measured_gib in (
        ("nepa_s14", 256, 2, False, 13.7),
        ("nepa_b14", 256, 2, False, 26.8),
        ("nepa_l14", 128, 2, False, 37.4),
        ("nepa_h14", 64, 2, False, 36.2),
        ("nepa_s14", 256, 2, True, 13.00),
        ("nepa_s14", 768, 2, True, 36.58),
        ("nepa_b14", 256, 2, True, 25.46),
        ("nepa_l14", 128, 0, True, 35.28),
        ("nepa_l14", 128, 1, True, 35.72),
        ("nepa_l14", 128, 2, True, 35.72),
        ("nepa_h14", 64, 2, True, 34.80),
    ):
        arch = get_arch(name)
        estimate = estimate_memory(
            arch,
            count_params(arch)["total"],
            micro_batch=micro,
            precision="bf16",
            zero_stage=zero_stage,
            world_size=1,
            compiled=compiled,
        )
        assert abs(estimate.peak_gb / measured_gib - 1) < 0.06, (name, micro, zero_stage, compiled, estimate)
