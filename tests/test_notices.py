"""Notices reach only what handles them, and nothing compiles inside a job.

A SLURM notice (``scancel --signal=USR2``) reaches every process of a job step: the children of a
task too. Here a real process with the engine's flag installed starts a subprocess and a spawn
child (what a DataLoader worker started with spawn is), and the notice goes to its whole process
group as SLURM sends it; the same on the cluster: tests/test_multinode.py.

DeepSpeed's CPU communication op used to be compiled inside jobs whenever another ninja binary, or
another PATH, had built it last (docs/performance.md): no process may build it, whatever its PATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, env

CHILDREN = r"""
import multiprocessing, subprocess, sys, time
from nepa_scale.engine.preemption import PreemptionFlag

flag = PreemptionFlag().install()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
spawned = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
spawned.start()
time.sleep(3)  # the spawn child is past its interpreter's start
print("ready", flush=True)
deadline = time.time() + 60
while flag.received is None and time.time() < deadline:
    time.sleep(0.01)
time.sleep(1)  # the children have had the notice as long
print("flag", flag.received and flag.received.name, "children", child.poll(), spawned.exitcode, flush=True)
child.kill()
spawned.kill()
"""


def test_a_notice_to_the_whole_process_group_reaches_only_the_flag_not_the_children():
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILDREN],
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job step's tasks have
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for sig in (signal.SIGUSR2, signal.SIGTERM):  # both notices, to every process of the group
        os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    # The flag took the first notice; the subprocess and the spawn child are still running (a child
    # killed by a notice would show its exit code, -12 or -15).
    assert out.strip() == "flag SIGUSR2 children None None", out + err


def test_no_process_rebuilds_the_communication_op_whatever_its_path(tmp_path):
    """Processes with and without the environment's bin/ on PATH, and with another ninja first on
    it, start DeepSpeed's communication: none builds the op (no file of it changes, no ninja runs)."""
    built = Path(sys.prefix) / "torch_extensions" / "deepspeed_shm_comm"
    assert (built / "deepspeed_shm_comm.so").is_file() and (built / "nepa_build.json").is_file(), (
        "make setup builds it"
    )

    def files() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in built.iterdir()}

    before = files()
    spy = tmp_path / "bin"
    spy.mkdir()
    calls = tmp_path / "ninja_calls"
    (spy / "ninja").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    (spy / "ninja").chmod(0o755)
    system_path = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if Path(p).resolve() != Path(sys.executable).parent.resolve()
    )
    script = (
        "from nepa_scale.engine.distributed import init_world; init_world(); "
        "import deepspeed.comm as comm; assert comm.is_initialized()"
    )
    for path in (
        f"{Path(sys.executable).parent}{os.pathsep}{system_path}",  # an activated environment
        system_path,  # a job submitted from outside it
        f"{spy}{os.pathsep}{system_path}",  # another ninja first
    ):
        extra = {k: v for k, v in env().items() if k != "TORCH_EXTENSIONS_DIR"}
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**extra, "PATH": path},
            cwd=tmp_path,  # another working directory, as a job's snapshot has
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Building extension" not in done.stdout + done.stderr
        assert "Emitting ninja build file" not in done.stdout + done.stderr
    assert not calls.exists(), calls.read_text()
    assert files() == before
