"""Bad input, round 3: what a new user hit, each answered in one line (or done right), with nothing
the user had lost or overwritten; and every subcommand on folders that hold no run, the wrong
kind of run, or nothing at all, without a traceback.

The numbers in the test names are the items of the issue that asked for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import DIGITS_CONFIG, REPO, cli, metrics, photo_folder, run_and_signal, run_train

FINETUNE_CONFIG = REPO / "configs" / "finetune_digits_tiny.yaml"
SEGMENT_CONFIG = REPO / "configs" / "segment_digits_tiny.yaml"
RUN = ["budget.images=1280", "checkpoint.every=5", "logging.log_every=1"]  # 40 steps of 32


def one_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single error line of a failed command (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("nepa-scale: error:")]
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0].removeprefix("nepa-scale: error: ")


def files_of(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` and its size: what "nothing was lost or overwritten" compares."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """(10) A run stopped with Ctrl-C (SIGINT) at step 10 or later: one line, a checkpoint, status
    stopped, exit 130; the copies of it serve the other cases."""
    run_dir = tmp_path_factory.mktemp("bad") / "stopped"
    result = run_and_signal(run_dir, *RUN, at_step=10, sig=signal.SIGINT)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert "stopped (Ctrl-C) at step" in result.stderr and "the same command resumes it" in result.stderr
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "stopped" and info["preempted_by"] == "SIGINT" and info["step"] >= 10
    assert (run_dir / "checkpoints" / f"step_{info['step']:08d}" / "COMMITTED").is_file()
    return run_dir


def copy_of(stopped: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(stopped, target)
    return target


@pytest.mark.parametrize(
    "overrides, message",
    [
        # (1) every val_loss was 0.0
        (
            ["logging.eval_every=10", "logging.eval_batches=0"],
            "logging.eval_batches: must be >= 1 (or null: the whole val split), got 0",
        ),
        # (2) the lr never reached its peak
        (
            ["optim.warmup_steps=1000", "budget.images=640"],
            "optim.warmup_steps: 1000 steps of warmup, but the run has 20 steps",
        ),
        # (3) the lr rose to 0.5
        (["optim.min_lr=0.5", "optim.lr=1e-3"], "optim.min_lr: 0.5 is above the peak lr 0.001 (optim.lr)"),
        # (9) OverflowError in total_steps
        (["budget.images=null", "budget.epochs=.inf"], "budget.epochs: expected a finite number, got inf"),
        (["budget.images=null", "budget.flops=.inf"], "budget.flops: expected a finite number, got inf"),
        # (15) caught only as a non-finite loss at step 2
        (["optim.lr=.inf"], "optim.lr: expected a finite number, got inf"),
    ],
)
def test_settings_that_would_train_nonsense_are_refused_in_one_line(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    error = one_line(run_train(run_dir, *overrides), code=2)
    assert error.startswith(message), error
    assert not (run_dir / "run.json").exists()  # nothing started


def test_15_a_non_finite_loss_records_the_step_it_happened(tmp_path):
    run_dir = tmp_path / "run"
    error = one_line(run_train(run_dir, "budget.images=320", "optim.lr=1e12", "optim.clip_grad=0"))
    step = int(error.split("non-finite loss at step ")[1].split()[0])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["failed_at_step"] == step


def test_4_a_sweep_with_a_bad_key_does_not_launch_quietly(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(DIGITS_CONFIG),
                "axes": [{"grid": {"budget.image": [640, 1280]}}],  # budget.images, misspelt
                "profile": "cpu",
                "output_root": str(tmp_path / "typo"),
            }
        )
    )
    result = cli("sweep", "launch", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.startswith("submitted 0 of 2 runs")
    assert result.stdout.count("its config is invalid (budget.image: unknown key") == 2, result.stdout
    assert "2 run(s) of" in result.stdout


def test_5_a_run_whose_history_is_gone_does_not_resume_silently(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path, "no_history")
    (run_dir / "metrics.jsonl").unlink()
    before = files_of(run_dir)
    error = one_line(run_train(run_dir, *RUN))
    assert (
        f"{run_dir / 'metrics.jsonl'} has no line of steps 1-" in error and "(the file is missing)" in error
    )
    assert "checkpoint.allow_lost_history=true" in error
    assert files_of(run_dir) == before  # nothing written, nothing removed
    done = run_train(run_dir, *RUN, "checkpoint.allow_lost_history=true")
    assert done.returncode == 0, done.stderr[-3000:]
    restart = json.loads((run_dir / "run.json").read_text())["restarts"][-1]
    assert any(change.startswith("history lost:") for change in restart["changes"]), restart


def test_6_a_budget_cannot_shrink_below_the_step_reached(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path, "shrunk")
    step = json.loads((run_dir / "run.json").read_text())["step"]
    before = files_of(run_dir)
    error = one_line(run_train(run_dir, *RUN, "budget.images=160", "checkpoint.allow_budget_change=true"))
    assert f"the new length (5 steps) ends before step {step}, where the checkpoint is" in error, error
    assert files_of(run_dir) == before


def test_7_a_stale_export_is_refused_and_export_says_its_step(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path, "exported")
    step = json.loads((run_dir / "run.json").read_text())["step"]
    exported = cli("export", str(run_dir))
    assert exported.returncode == 0 and f"exported step {step} of {run_dir}" in exported.stdout
    assert oct((run_dir / "export" / "model.safetensors").stat().st_mode & 0o777) == oct(
        0o666 & ~current_umask()
    )  # (16)
    assert run_train(run_dir, *RUN).returncode == 0  # the run goes on to step 40: the export is stale now
    error = one_line(
        run_train(
            tmp_path / "ft",
            "budget.epochs=null",
            "budget.images=64",
            f"finetune.pretrained={run_dir}",
            config=FINETUNE_CONFIG,
        ),
        code=2,
    )
    assert error == (
        f"finetune.pretrained: {run_dir} has the export of step {step}, but its newest checkpoint is step 40: "
        f"run `nepa-scale export {run_dir}` first"
    )


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_8_attach_names_the_runs_it_leaves_out(stopped, tmp_path):
    from nepa_scale.launch.sweep import load_sweep
    from nepa_scale.rundir import RunDir, RunRecord
    from nepa_scale.workflows.attach import attached_sweep

    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "base": str(DIGITS_CONFIG),
                "axes": [{"seeds": 2}],
                "profile": "cpu",
                "output_root": str(tmp_path / "study"),
                "attach": {"ft": {"sweep": "ft.yaml"}},
            }
        )
    )
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"base": str(FINETUNE_CONFIG), "profile": "cpu"}))
    study = load_sweep(study_file)
    done, running = study.runs
    RunDir(done.run_dir).write_record(RunRecord(status="completed", config=done.config_data))
    RunDir(running.run_dir).write_record(RunRecord(status="running", config=running.config_data))
    attached = attached_sweep(study, "ft")
    assert len(attached.runs) == 1
    assert attached.warnings[-1].startswith(
        f"attach.ft: {running.run_id} is running, not complete: not attached"
    )


def test_10_a_stopped_run_resumes_with_the_same_command(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path, "resumed")
    done = run_train(run_dir, *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert (
        info["status"] == "completed"
        and info["restarts"][-1]["from_step"] == json.loads((stopped / "run.json").read_text())["step"]
    )
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, 41))  # every step once


@pytest.fixture
def mounted(tmp_path):
    """A tmpfs mounted at a folder (options given), unmounted after the test."""
    mounts = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mount{len(mounts)}"
        target.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_11_export_to_a_read_only_folder_is_one_line(stopped, mounted):
    target = mounted("ro,size=1m")
    error = one_line(cli("export", str(stopped), "--out", str(target / "export")), code=2)
    assert error.startswith(f"export: cannot write to {target / 'export'}: Read-only file system"), error


def test_12_a_full_disk_is_one_line_and_recorded(mounted):
    disk = mounted("size=600k")  # run.json and the log fit; a checkpoint (about 1 MB) does not
    run_dir = disk / "run"
    error = one_line(run_train(run_dir, *RUN))
    assert error.startswith(f"no space left on the device of {run_dir}:") and "needs about" in error, error
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("StorageError: no space left")
    assert not list((run_dir / "checkpoints").glob("*/COMMITTED"))


def test_12b_a_failure_run_json_cannot_record_still_surfaces_itself(mounted, caplog):
    """A training error whose run.json write then fails (a folder gone read-only) is what the run
    raises, with the write's error in the log: not a PermissionError hiding the cause."""
    import torch  # the world's device; only this test of the file needs it

    from nepa_scale.config import load_config
    from nepa_scale.engine.distributed import World
    from nepa_scale.engine.fingerprint import resume_digest
    from nepa_scale.engine.outcomes import failure
    from nepa_scale.rundir import RunDir

    disk = mounted("size=1m")
    run = RunDir(disk / "run")
    config = load_config(DIGITS_CONFIG, [f"output_dir={run.root}"])
    run.created(config, resume_digest(config))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    error = RuntimeError("the loss went NaN at step 5")
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    assert failure(error, run, world, config, lambda: 0, 5, 0) is error
    assert f"could not record the failure in {run.run_json}" in caplog.text
    assert run.record().status == "created"


def test_13_probe_and_segment_eval_name_the_kind_of_run(stopped, tmp_path):
    finetune = tmp_path / "finetune"
    source = copy_of(stopped, tmp_path, "source")
    assert cli("export", str(source)).returncode == 0
    done = run_train(
        finetune,
        "budget.epochs=null",
        "budget.images=64",
        f"finetune.pretrained={source}",
        config=FINETUNE_CONFIG,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    error = one_line(cli("probe", str(finetune)), code=2)
    assert (
        error
        == f"{finetune} is a finetune run: `nepa-scale probe` takes pretraining runs (it started from {source})"
    )
    error = one_line(cli("segment-eval", str(stopped)), code=2)
    assert f"{stopped} is a pretrain run, not a segmentation run" in error


def test_16_skipped_files_are_listed_once_with_the_reason(tmp_path):
    from PIL import Image

    data = photo_folder(tmp_path / "data" / "train", classes=2, per_class=20).parent
    for i in range(3):  # unreadable: garbage, and a decompression bomb (15000 x 15000 pixels, 1 bit)
        (data / "train" / "class0" / f"bad{i}.JPEG").write_bytes(b"not an image" * 10)
    Image.new("1", (15000, 15000)).save(data / "train" / "class1" / "huge.png")
    shutil.copytree(data / "train", data / "val")
    result = run_train(tmp_path / "run", "data.kind=imagefolder", f"data.root={data}", "budget.images=320")
    assert result.returncode == 0, result.stderr[-3000:]  # 10 steps of 32: every file read 7-8 times
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert sorted(Path(p).name for p in info["skipped_files"]) == [
        "bad0.JPEG",
        "bad1.JPEG",
        "bad2.JPEG",
        "huge.png",
    ]
    assert "DecompressionBombError" in result.stderr and "UnidentifiedImageError" in result.stderr


def test_16_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: nepa_tiny\n  overrides: {dim: 64\nbudget:\n  images: 100\n")
    error = one_line(cli("train", str(path)), code=2)
    assert error.startswith(f"{path}: not valid YAML at line 4, column 7: expected ',' or '}}'"), error


def test_16_report_names_the_run_without_a_number(stopped, tmp_path):
    from nepa_scale.scaling.report import StudySettings, build_report

    study = tmp_path / "study"
    for name in ("a", "b"):
        shutil.copytree(stopped, study / name)
        info = json.loads((study / name / "run.json").read_text())
        info["status"] = "completed"
        (study / name / "run.json").write_text(json.dumps(info))
    with (study / "b" / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"kind": "train", "step": 99, "loss": float("nan")}) + "\n")
    report = build_report(
        study, tmp_path / "r", StudySettings(n_bootstrap=0, window=1, quantity="cosine_distance")
    )
    assert any(
        w.startswith("run b: its cosine_distance is nan (not a positive number)") for w in report.warnings
    )


# ----------------------------------------------------------------------------- every subcommand


def run_kinds(tmp_path: Path, stopped: Path) -> dict[str, Path]:
    """An empty folder, a pretraining run (the wrong kind for most commands), a file that is no
    config, and a path that does not exist."""
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("not a config\n")
    return {"empty": empty, "run": stopped, "text": text, "missing": tmp_path / "nowhere"}


COMMANDS = [
    ["train", "{path}"],
    ["export", "{path}", "--out", "{out}"],
    ["probe", "{path}", "--train-per-class", "2", "--val-per-class", "2"],
    ["segment-eval", "{path}"],
    ["collect", "{path}", "--out", "{out}"],
    ["report", "{path}", "--bootstrap", "0", "--out", "{out}"],
    ["resize-data", "{path}", "{out}", "--short-side", "8"],
    ["prepare-data", "{path}", "{out}"],
    ["sweep", "plan", "{path}"],
    ["sweep", "launch", "{path}"],
    ["sweep", "status", "{path}"],
    ["sweep", "cancel", "{path}"],
    ["sweep", "preempt", "{path}", "--run", "x"],
    ["sweep", "attach", "{path}"],
    ["demo", "--sweep", "{path}", "--output-root", "{out}"],
]


def test_every_subcommand_on_nothing_the_wrong_run_or_no_path_answers_without_a_traceback(
    stopped, tmp_path, capsys
):
    """In one process (the CLI's own main): what reaches the user is a result or one error line."""
    from nepa_scale.cli import main

    kinds = run_kinds(tmp_path, stopped)
    before = files_of(stopped)
    for n, command in enumerate(COMMANDS):
        for kind, path in kinds.items():
            out = tmp_path / f"out{n}_{kind}"
            argv = [part.replace("{path}", str(path)).replace("{out}", str(out)) for part in command]
            where = f"nepa-scale {' '.join(argv)} ({kind})"
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code
            except BaseException as exc:  # noqa: BLE001 - a traceback would reach the user
                pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("nepa-scale: error:")]
            assert code == 0 or len(errors) == 1, f"{where} -> {code}:\n{err[-2000:]}"
    after = files_of(
        stopped
    )  # the run the commands were pointed at: every file as it was (a probe adds its record)
    assert {k: v for k, v in after.items() if k in before} == before
