"""One writer per run: the run directory's lock (nepa_scale/ownership.py) with real processes.

A second `nepa-scale train` on a run another process trains is refused in one line naming it and
writes nothing; a killed owner's lock is taken over by the next `train`, which resumes the run;
concurrent successors leave exactly one owner; an owner's SLURM job is asked of the real local
cluster; and two `sweep launch` of one sweep train each run once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import DIGITS_CONFIG, REPO, SMALL, cli, env, launch, metrics, run_train

from nepa_scale.errors import RunBusy
from nepa_scale.ownership import LOCK_FILE, acquire, read_owner, this_process, why_gone

DEADLINE_S = 300


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_lock(folder: Path, owner) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(owner)))


def ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_train_is_refused_in_one_line_and_a_killed_owners_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    steps = ["budget.images=1280", "checkpoint.every=10"]  # 40 steps
    (first,) = launch(run_dir, *steps)
    wait_for(lambda: metrics(run_dir), "the first train's first step")
    os.kill(first.pid, signal.SIGSTOP)  # alive, holding the lock, writing nothing meanwhile
    try:
        before = files_of(run_dir)
        second = run_train(run_dir, *steps, timeout=DEADLINE_S)
        assert second.returncode == 1, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"nepa-scale: error: {run_dir}: in use by another process (train, pid {first.pid} on host "
            f"{os.uname().nodename}, since {read_owner(run_dir).created}); wait for it to end, or stop it"
        ]
        assert files_of(run_dir) == before  # nothing written
    finally:
        first.kill()  # the owner dies without giving the lock up (SIGKILL works on a stopped process)
        first.communicate()
    assert read_owner(run_dir).pid == first.pid
    third = run_train(run_dir, *steps, timeout=DEADLINE_S)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the lock of train, pid {first.pid}" in third.stderr
    assert f"pid {first.pid} has ended" in third.stderr
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 41))  # every line once
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert not (run_dir / LOCK_FILE).exists()  # given up on exit


CONTENDERS = r"""
import dataclasses, json, os, sys
from pathlib import Path
from nepa_scale.errors import RunBusy
from nepa_scale.errors import RunBusy
from nepa_scale.ownership import LOCK_FILE, acquire, read_owner, this_process

root, rounds, contenders, dead_pid = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
stale = dataclasses.replace(this_process("train"), pid=dead_pid, token="stale")
for round in range(rounds):
    folder = root / str(round)
    folder.mkdir(parents=True)
    (folder / LOCK_FILE).write_text(json.dumps(dataclasses.asdict(stale)))
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    results_read, results_write = os.pipe()
    children = []
    for _ in range(contenders):
        pid = os.fork()
        if pid == 0:  # a successor: all start at once, when the go pipe closes
            os.close(go_write), os.close(done_write), os.close(results_read)
            os.read(go_read, 1)
            try:
                held = acquire(folder, "train")
                verdict = f"won {os.getpid()}"
            except RunBusy as exc:
                held, verdict = None, f"refused {exc}"
            os.write(results_write, (verdict + "\n").encode())
            os.read(done_read, 1)  # the winner holds the lock until every verdict is in
            if held is not None:
                held.release()
            os._exit(0)
        children.append(pid)
    os.close(go_read), os.close(go_write), os.close(done_read), os.close(results_write)
    with os.fdopen(results_read) as results:
        verdicts = [results.readline().strip() for _ in range(contenders)]
    owner = read_owner(folder).pid
    os.close(done_write)
    for pid in children:
        os.waitpid(pid, 0)
    print(json.dumps({"verdicts": verdicts, "owner": owner, "left": sorted(p.name for p in folder.iterdir())}))
"""


def test_concurrent_successors_of_a_dead_owner_leave_exactly_one_owner(tmp_path):
    """Rounds of three successors released at once (forked, then a pipe closed) on a dead owner's
    lock: one wins, the others are refused naming it. (A takeover that removed the stale lock and
    created its own let two win in about one round of ten; memory, not a disk, keeps the rounds
    quick and the successors close together.)"""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else tmp_path))
    try:
        done = subprocess.run(
            [sys.executable, "-c", CONTENDERS, str(root), "30", "3", str(ended_pid())],
            env=env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
    finally:
        shutil.rmtree(root)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rounds) == 30
    for result in rounds:
        winners = [v for v in result["verdicts"] if v.startswith("won")]
        assert winners == [f"won {result['owner']}"], result["verdicts"]
        for verdict in result["verdicts"]:
            assert verdict in winners or f"(train, pid {result['owner']} on host" in verdict, verdict
        assert result["left"] == []  # the winner gave it up; no guard or staging file is left


def test_an_owner_is_gone_only_when_provably_so(tmp_path):
    """Same host: a live pid is respected, one that ended or that another process reuses is not (a
    pid of another pid namespace cannot be checked: respected).
    Another host: its SLURM job decides (asked of the real cluster); without one it is respected
    and the message names the file to remove. A requeued job takes over its own earlier lock."""
    subprocess.run(["bash", str(REPO / "slurm/local/start.sh")], check=True, capture_output=True)
    me = this_process("train")
    assert why_gone(dataclasses.replace(me, pid=os.getppid(), process_start=None), me) is None
    assert why_gone(dataclasses.replace(me, pid=ended_pid()), me).endswith("has ended")
    reused = dataclasses.replace(me, process_start=me.process_start - 1)
    assert why_gone(reused, me) == f"pid {me.pid} is another process now"
    other_pids = dataclasses.replace(me, pid=ended_pid(), pid_namespace="pid:[1]")  # another container's
    assert why_gone(other_pids, me) is None
    incarnation = dataclasses.replace(me, slurm_job="7_1", slurm_job_id="9", slurm_restart=1)
    assert "was requeued" in why_gone(dataclasses.replace(incarnation, slurm_restart=0), incarnation)

    elsewhere = dataclasses.replace(me, host="another-host", token="elsewhere")
    write_lock(tmp_path / "a", elsewhere)
    with pytest.raises(RunBusy) as refused:
        acquire(tmp_path / "a", "train")
    assert str(refused.value).endswith(
        f"it cannot be checked from here: remove {tmp_path / 'a' / LOCK_FILE} once it is gone"
    )
    held = subprocess.run(
        ["sbatch", "--parsable", "--hold", "-p", "debug", "--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        write_lock(tmp_path / "b", dataclasses.replace(elsewhere, slurm_job=held, slurm_job_id=held))
        with pytest.raises(RunBusy) as refused:
            acquire(tmp_path / "b", "train")
        assert f"SLURM job {held}, since" in str(refused.value) and "wait for it to end" in str(refused.value)
    finally:
        subprocess.run(["scancel", held], check=True)
    wait_for(lambda: why_gone(read_owner(tmp_path / "b"), me) is not None, "the cancelled job to end", 60)
    with acquire(tmp_path / "b", "train") as taken:
        assert read_owner(tmp_path / "b").token == taken.owner.token


def write_sweep(root: Path) -> Path:
    spec = {
        "name": "twice",
        "base": str(DIGITS_CONFIG),
        "set": {key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in SMALL)},
        "axes": [{"grid": {"budget.images": [640, 320]}}],  # 20 and 10 steps
        "profile": "cpu",
        "resources": {"array_parallelism": 1},
        "output_root": str(root / "twice"),
    }
    path = root / "twice.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_two_launches_of_one_sweep_train_each_run_once(tmp_path):
    """The second `sweep launch` starts while the first one's first run trains: it submits the
    other run; the first launch, when that run's turn comes, finds it done and says so."""
    from nepa_scale.launch.sweep import load_sweep  # heavy: torch (the runs' plans)

    path = write_sweep(tmp_path)
    longer, shorter = load_sweep(path).runs  # the launch runs the longer one first
    first = subprocess.Popen(
        [sys.executable, "-m", "nepa_scale.cli", "sweep", "launch", str(path)],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: metrics(longer.run_dir), "the first launch's first run to train")
    training = read_owner(longer.run_dir)
    assert training.role == "train"
    os.kill(training.pid, signal.SIGSTOP)  # it holds on while the second launch comes and goes
    try:
        second = cli("sweep", "launch", str(path))
    finally:
        os.kill(training.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=DEADLINE_S)
    assert (
        second.returncode == 0 and f"submitted 1 of 2 runs: {shorter.run_id}" in second.stdout.splitlines()
    ), second.stdout + second.stderr[-3000:]
    assert first.returncode == 0, out + err[-3000:]
    assert f"submitted 1 of 2 runs: {longer.run_id}" in out.splitlines(), out
    assert f"{shorter.run_id}: not submitted: it is completed now" in err
    for run, steps in ((longer, 20), (shorter, 10)):
        assert len(json.loads((run.run_dir / "launch.json").read_text())["jobs"]) == 1, run.run_id
        assert [m["step"] for m in metrics(run.run_dir)] == list(range(1, steps + 1))
        record = json.loads((run.run_dir / "run.json").read_text())
        assert record["status"] == "completed" and record["restarts"] == []
