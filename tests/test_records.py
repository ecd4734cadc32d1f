"""The run record, the CLI's error contract and the notice-during-start-up mechanism: no engine needed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time

import pytest
from helpers import REPO, cli, env

from nepa_scale.engine.fingerprint import completed_with, resume_digest
from nepa_scale.launch.executors import job_python
from nepa_scale.rundir import Interruption, RunDir, RunRecord, write_json_atomic

OLD_RUN = REPO / "tests" / "data" / "run_schema1"  # written by the code before the typed record


def test_a_run_directory_written_by_the_previous_code_reads_back(tmp_path):
    run = RunDir(tmp_path / "old")
    shutil.copytree(OLD_RUN, run.root)
    record = run.record()
    assert record.status == "completed" and record.step == record.total_steps == 300
    assert record.resume_digest == json.loads((OLD_RUN / "run.json").read_text())["config_hash"]
    assert record.run_config().model.overrides == {"dim": 48, "depth": 2, "num_heads": 2}
    # Written back, it keeps every field it had (nothing the analysis reads is lost).
    run.write_record(record)
    again = json.loads(run.run_json.read_text())
    before = json.loads((OLD_RUN / "run.json").read_text())
    for key, value in before.items():
        if key not in ("config_hash", "schema_version", "updated"):
            assert again[key] == value, key
    # Its checkpoint exports (committed before the resume rule recorded precision and length).
    from nepa_scale.engine.export import export_run

    assert export_run(run.root)["official"].is_file()


def test_transitions_write_the_documented_record(tmp_path):
    run = RunDir(tmp_path / "r")
    from nepa_scale.config import load_config

    config = load_config(REPO / "configs" / "digits_tiny.yaml", [f"output_dir={run.root}"])
    run.created(config, resume_digest(config))
    assert run.record().status == "created" and run.record().resume_digest == resume_digest(config)
    run.started(None, total_steps=10, world_size=1)
    run.preempted(4, config.budget.global_batch, "SIGUSR2")
    record = run.interrupted(Interruption("SIGUSR2", "timeout", "requeue", 4, steps_done=0))
    assert record.timeouts == 1 and record.idle_timeouts == 1
    record = run.interrupted(Interruption("SIGUSR2", "preemption", "requeue", 6, steps_done=2))
    assert record.timeouts == 1 and record.idle_timeouts == 1
    run.skipped(["a.jpg"])
    run.completed(10, config.budget.global_batch)
    data = json.loads(run.run_json.read_text())
    assert data["status"] == "completed" and data["images_seen"] == 10 * config.budget.global_batch
    assert data["interruptions"][0]["steps_done"] == 0 and data["skipped_files"] == ["a.jpg"]
    assert RunRecord.from_dict(data).to_dict() == data


def test_a_completed_run_is_recognised_only_with_the_same_length_and_its_final_checkpoint(tmp_path):
    from nepa_scale.config import load_config

    run = RunDir(tmp_path / "old")
    shutil.copytree(OLD_RUN, run.root)
    config = load_config(run.config_yaml, [f"output_dir={run.root}"])
    run.write_record(RunRecord.from_dict({**run.record().to_dict(), "resume_digest": resume_digest(config)}))
    assert completed_with(run, config) is not None
    longer = load_config(run.config_yaml, [f"output_dir={run.root}", "budget.images=19200"])
    assert completed_with(run, longer) is None
    (run.checkpoints / "step_00000300" / "COMMITTED").unlink()
    assert completed_with(run, config) is None


@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_the_last_train_line_is_read_from_the_end_of_the_log(tmp_path, block):
    """What a poll shows of a long run, without parsing its whole log: the same record as the full
    read, across block boundaries, past eval lines, a line cut mid-write and a blank line."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    assert run.last_metric("train", block) is None  # no log yet
    for step in range(1, 40):
        run.append_metrics({"kind": "train", "step": step, "loss": 1 / step, "note": "x" * (step % 5)})
        if step % 10 == 0:
            run.append_metrics({"kind": "eval", "step": step, "val_loss": 0.5})
    with run.metrics.open("a") as handle:
        handle.write('\n{"kind": "eval", "step": 40}\n{"kind": "train", "st')  # killed mid-write
    expected = [m for m in run.read_metrics() if m.get("kind") == "train"][-1]
    assert run.last_metric("train", block) == expected and expected["step"] == 39
    assert run.last_metric("eval", block) == {"kind": "eval", "step": 40}
    assert run.last_metric("finetune", block) is None


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_records_and_markers_respect_the_umask(tmp_path, umask):
    """mkstemp alone makes 0600 files that colleagues on a shared file system cannot read."""
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "run.json", {"a": 1})
        run = RunDir(tmp_path)
        run.append_metrics({"step": 1})
        run.append_metrics({"step": 2})
        run.truncate_metrics(1, 0)
    finally:
        os.umask(old)
    for name in ("run.json", "metrics.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_notice_during_python_start_up_reaches_the_flag(tmp_path):
    """The job's python blocks the notices before anything else runs; the flag unblocks them once
    installed. A SIGUSR2 sent while the interpreter starts is then handled, never fatal."""
    ready = tmp_path / "ready"
    code = (
        "import pathlib, time; "
        f"pathlib.Path({str(ready)!r}).touch(); "
        "time.sleep(0.5); "  # the notice arrives here, before any handler exists
        "from nepa_scale.engine.preemption import PreemptionFlag; "
        "flag = PreemptionFlag().install(); "
        "print(flag.received.name if flag.received else 'none')"
    )
    command = [*shlex.split(job_python()), "-c", code]  # as submitit's controller and srun start it
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR2)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0 and out.strip() == "SIGUSR2"


def test_project_errors_are_one_line_and_other_errors_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import nepa_scale.cli.runs as commands
    from nepa_scale.cli import main
    from nepa_scale.errors import DataError

    missing = cli("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert "sweep directory not found" in missing.stderr

    def raises(error):
        def command(args):
            raise error

        return command

    monkeypatch.setattr(commands, "cmd_models", raises(DataError("data: the folder x has no images")))
    assert main(["models"]) == 1
    assert capsys.readouterr().err == "nepa-scale: error: data: the folder x has no images\n"
    monkeypatch.setattr(commands, "cmd_models", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed into one line
        main(["models"])
    import torch

    monkeypatch.setattr(commands, "cmd_models", raises(torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        main(["models"])
    hint = capsys.readouterr().err
    assert "budget.micro_batch" in hint and "model.grad_checkpointing" in hint


def test_each_sweep_action_takes_only_its_own_options(capsys):
    """`--comm` is plan's, `--run` preempt's (and required there), `--retry-failed` launch's and
    attach's: offered to another action, argparse refuses them in one usage line."""
    from nepa_scale.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sweep", "plan", "s.yaml", "--comm"]).comm
    assert parser.parse_args(["sweep", "preempt", "s.yaml", "--run", "r1"]).run == "r1"
    assert parser.parse_args(
        ["sweep", "attach", "s.yaml", "--retry-failed", "--name", "segment"]
    ).retry_failed
    for argv in (
        ["sweep", "status", "s.yaml", "--comm"],
        ["sweep", "launch", "s.yaml", "--run", "r1"],
        ["sweep", "preempt", "s.yaml"],
        ["sweep", "cancel", "s.yaml", "--retry-failed"],
        ["report", "d", "--convention", "6ND"],
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2, argv
    assert "invalid choice: '6ND'" in capsys.readouterr().err
