"""Bad input, round 3: what a new user hit, each answered in one line (or done right), with nothing
the user had lost or overwritten; and every subcommand on folders that hold no run, the wrong
kind of run, or nothing at all, without a traceback.

The numbers in the test names are the items of the issue that asked for them.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
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
    """Round 4: at 200 kB the checkpoint's first file (about 240 kB) fills the disk, and the failed
    save left it open: its blocks stayed taken after it was removed, and run.json stayed running."""
    disk = mounted("size=200k")  # run.json and the log fit; a checkpoint (about 0.7 MB) does not
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


def test_12c_a_full_disk_that_cannot_take_run_json_says_so(mounted):
    """No room even for run.json (the disk filled by something else): the one line says that
    run.json's status is stale, and nothing on the disk is removed to make room."""
    import torch  # the world's device; only this test of the file needs it

    from nepa_scale.config import load_config
    from nepa_scale.engine.distributed import World
    from nepa_scale.engine.fingerprint import resume_digest
    from nepa_scale.engine.outcomes import failure
    from nepa_scale.errors import StorageError
    from nepa_scale.rundir import RunDir

    disk = mounted("size=64k")
    run = RunDir(disk / "run")
    config = load_config(DIGITS_CONFIG, [f"output_dir={run.root}"])
    run.created(config, resume_digest(config))
    with (disk / "ballast").open("wb", buffering=0) as ballast:  # someone else's file, filling the disk
        with pytest.raises(OSError):
            while True:
                ballast.write(b"x" * 4096)
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    error = OSError(errno.ENOSPC, "No space left on device")
    meaning = failure(error, run, world, config, lambda: 10**6, 5, 0)
    assert isinstance(meaning, StorageError) and str(meaning).endswith(
        "(run.json could not be rewritten for want of room either: the status it shows is stale until "
        "the run starts again)"
    )
    assert run.record().status == "created" and (disk / "ballast").stat().st_size > 0


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


# ----------------------------------------------------------------------------- round 4

REPORT = ["report", "{study}", "--bootstrap", "0"]


@pytest.mark.parametrize(
    "argv, code, message",
    [
        # An unset shell variable: the run went into the current folder.
        (
            ["train", "{config}", "output_dir="],
            2,
            "output_dir: must name the run's folder, got '' (an unset variable?)",
        ),
        # "config file not found" for a folder that is there.
        (["train", "{tmp}"], 2, "config file {tmp} is a directory: name the YAML file in it"),
        # Tracebacks from numpy, timm and mkdir (the last after the engine was built).
        (["train", "{config}", "seed=-1"], 2, "seed: must be in [0, 4294967295], got -1"),
        (
            ["train", "{config}", "data.interpolation=bicubc"],
            2,
            "data.interpolation: unknown interpolation 'bicubc' (choose from bicubic, bilinear, nearest, box, "
            "hamming, lanczos)",
        ),
        (
            ["train", "{config}", "output_dir={file}/run"],
            2,
            "output_dir: {file} is a file, not a folder (so {file}/run cannot be made inside it)",
        ),
        # Refused only when the first metric was written, with run.json left running.
        (
            ["train", "{config}", "logging.tensorboard=yes"],
            2,
            "logging.tensorboard: needs the tensorboard package (pip install tensorboard)",
        ),
        # A chance-level kNN; a probe on all but one image per class.
        (["probe", "{run}", "--k", "0"], 2, "probe --k: must be > 0, got 0"),
        (["probe", "{run}", "--train-per-class", "-1"], 2, "probe --train-per-class: must be > 0, got -1"),
        # A ValueError and a FileExistsError.
        ([*REPORT, "--window", "0"], 2, "--window: the log lines averaged for the loss, at least 1, got 0"),
        ([*REPORT, "--out", "{file}"], 2, "--out: {file} is a file, not a folder"),
    ],
)
def test_r4_bad_input_is_one_line_before_any_work(
    stopped, tmp_path, monkeypatch, capsys, argv, code, message
):
    """In one process (the CLI's own main), from an empty folder: one line, and nothing written
    anywhere (the run the probe is pointed at included)."""
    from nepa_scale.cli import main

    if "tensorboard" in message and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    where = tmp_path / "cwd"
    where.mkdir()
    monkeypatch.chdir(where)
    (tmp_path / "afile").write_text("notes\n")
    fill = {"{config}": str(DIGITS_CONFIG), "{tmp}": str(tmp_path), "{file}": str(tmp_path / "afile")}
    fill |= {"{run}": str(stopped), "{study}": str(stopped.parent)}
    argv = [fill.get(part, part) for part in argv]
    argv = [part.replace("{file}", fill["{file}"]) for part in argv]
    before = files_of(stopped.parent)
    assert main(argv) == code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nepa-scale: error:")]
    expected = message.replace("{tmp}", fill["{tmp}"]).replace("{file}", fill["{file}"])
    assert errors == [f"nepa-scale: error: {expected}"]
    assert not any(where.iterdir()) and files_of(stopped.parent) == before


def test_r4_help_speaks_to_users():
    from nepa_scale.cli import build_parser

    text = build_parser().format_help()
    assert "Scaling studies of NEPA vision pretraining" in text and "cli/" not in text


def r4_sweep(tmp_path: Path, name: str, spec: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"profile": "cpu", "output_root": str(tmp_path / name), **spec}))
    return path


def test_r4_a_warmup_longer_than_the_run_is_invalid_in_plan_launch_and_attach(tmp_path, capsys):
    """Bug: plan showed it valid, launch (and attach, for a fine-tune) submitted it, the job failed
    at once and the command exited 0."""
    from nepa_scale.cli import main

    why = (
        "optim.warmup_steps: 50 steps of warmup, but the run has 20 steps: the lr would never reach its peak"
    )
    long_warmup = {"optim.warmup_steps": 50, "budget.images": 640, "budget.global_batch": 32}
    study = r4_sweep(
        tmp_path,
        "study",
        {"base": str(DIGITS_CONFIG), "set": long_warmup, "attach": {"ft": {"sweep": "ft.yaml"}}},
    )
    assert main(["sweep", "plan", str(study)]) == 1
    assert f"INVALID: {why}" in capsys.readouterr().out
    assert main(["sweep", "launch", str(study)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("submitted 0 of 1 runs") and f"its config is invalid ({why}" in out, out
    # A completed pretraining run (its record, as test_8 writes it), and a fine-tune recipe whose warmup
    # is longer than its 10 steps.
    from nepa_scale.launch.sweep import load_sweep
    from nepa_scale.rundir import RunDir, RunRecord

    pretrained = r4_sweep(
        tmp_path, "pretrained", {"base": str(DIGITS_CONFIG), "attach": {"ft": {"sweep": "ft.yaml"}}}
    )
    (run,) = load_sweep(pretrained).runs
    RunDir(run.run_dir).write_record(RunRecord(status="completed", config=run.config_data))
    r4_sweep(tmp_path, "ft", {"base": str(FINETUNE_CONFIG), "set": {**long_warmup, "budget.epochs": None}})
    assert main(["sweep", "attach", str(pretrained)]) == 1
    out = capsys.readouterr().out
    assert "attach.ft: submitted 0 of 1 runs" in out and "optim.warmup_steps: 50 steps of warmup" in out, out
    assert f"1 run(s) of attach.ft ({tmp_path / 'ft.yaml'}) are invalid" in out


def test_r4_the_docs_isoflop_block_loads_as_written(tmp_path):
    """Bug: PyYAML reads 1.0e12 (no sign in the exponent) as a string, and the sweep refused the
    docs' own example."""
    from nepa_scale.launch.sweep import load_sweep

    text = (REPO / "docs" / "study_design.md").read_text().split("## IsoFLOP grids", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "compute: [1.0e12, 3.0e12, 1.0e13]" in block
    path = tmp_path / "isoflop.yaml"
    path.write_text(f"base: {DIGITS_CONFIG}\nprofile: cpu\noutput_root: {tmp_path / 'iso'}\n{block}")
    runs = load_sweep(path).runs
    assert [run.error for run in runs] == [None] * 9
    assert sorted({run.config.budget.flops for run in runs}) == [1e12, 3e12, 1e13]


def test_r4_a_refused_resume_loads_and_writes_nothing(stopped, tmp_path):
    """Bug: a changed probe subset was refused after the checkpoint was loaded, and config.yaml had
    been rewritten with the refused value by then."""
    run_dir = copy_of(stopped, tmp_path, "probed")
    info = json.loads((run_dir / "run.json").read_text())
    subset = {"images": 50, "classes": 10, "digest": "0" * 16}
    info["probe_subsets"] = {
        "seed": 0,
        "train_per_class": 5,
        "val_per_class": 5,
        "train": subset,
        "val": subset,
    }
    (run_dir / "run.json").write_text(json.dumps(info))  # the record of a run that probed 5 + 5 per class
    before, config_yaml = files_of(run_dir), (run_dir / "config.yaml").read_bytes()
    probes = ["logging.probe_every=20", "logging.probe_train_per_class=5", "logging.probe_val_per_class=4"]
    result = run_train(run_dir, *RUN, *probes)
    assert one_line(result, code=2).startswith(
        "logging.probe_val_per_class: the run probed with 5 before (run.json probe_subsets), now 4"
    )
    assert "resumed from" not in result.stderr  # refused before the checkpoint was loaded
    assert files_of(run_dir) == before and (run_dir / "config.yaml").read_bytes() == config_yaml


def edit_record(run_dir: Path, **config: dict) -> None:
    """Set sections of a run's recorded config (what it trained with), e.g. data={"kind": ...}."""
    info = json.loads((run_dir / "run.json").read_text())
    for section, values in config.items():
        info["config"][section].update(values)
    (run_dir / "run.json").write_text(json.dumps(info))


def test_r4_the_report_names_the_runs_it_leaves_out_and_the_lines_it_skips(tmp_path):
    """Bug: a study plus runs on other data and runs without probes was fitted all together, on the
    NEPA loss for everyone (because a few runs had no probe error), without a word; a corrupt line in
    the middle of a run's metrics.jsonl was skipped silently."""
    from test_scaling import law, make_run

    from nepa_scale.scaling.report import StudySettings, build_report

    study = tmp_path / "study"
    for dim in (48, 96, 192):  # the study: 3 widths x 2 budgets, probed online
        for steps in (100, 200):
            make_run(study, f"d{dim}_s{steps}", dim, steps, probe=lambda n, i, s, t: law(n, i))
            edit_record(study / f"d{dim}_s{steps}", logging={"probe_every": 100})
    for dim in (48, 96, 192):  # the same model on other data (the held-out loss only)
        make_run(study, f"other_d{dim}", dim, 200)
        edit_record(study / f"other_d{dim}", data={"kind": "synthetic"})
    make_run(study, "unprobed", 96, 200)  # the study's data, no online probes
    lines = (study / "d96_s200" / "metrics.jsonl").read_text().splitlines()
    lines[5] = lines[5][:20]  # a line cut in the middle of the file: damage
    (study / "d96_s200" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with (study / "d48_s200" / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "st')  # a last line being written: normal
    report = build_report(study, tmp_path / "r", StudySettings(n_bootstrap=0, window=1))
    assert report.quantity == "probe_linear_error" and len(report.fit("chinchilla").params) == 5
    assert report.fits["chinchilla"]["points"] == 6  # the study's runs only
    assert (
        "3 run(s) on synthetic (4096 images) at 16 px, not on the study's digits at 16 px (7 completed "
        "runs): not comparable, left out of the fits: other_d192, other_d48, other_d96"
    ) in report.warnings
    assert (
        "1 of 7 runs have no probe_linear_error (they ran without online probes, logging.probe_every: 0): "
        "left out of the fits: unprobed"
    ) in report.warnings
    damaged = [w for w in report.warnings if "not JSON" in w]
    assert damaged == [
        f"run d96_s200: {study / 'd96_s200' / 'metrics.jsonl'} line 6 is not JSON: skipped, so the table and "
        "the fits lack what it held (restore it from a copy, or compare the fits without this run)"
    ]
    table = pd.read_parquet(tmp_path / "r" / "table.parquet").drop_duplicates("run_id").set_index("run_id")
    assert table["left_out"].notna().sum() == 4 and table.loc["unprobed", "left_out"].startswith("no ")


def test_r4_runs_split_evenly_between_data_sets_are_refused():
    from nepa_scale.errors import FitError
    from nepa_scale.scaling.comparable import incomparable_runs

    table = pd.DataFrame(
        {
            "run_id": ["a", "b", "c", "d"],
            "status": ["completed"] * 4,
            "task": ["pretrain"] * 4,
            "data": ["digits at 16 px"] * 2 + ["synthetic (4096 images) at 16 px"] * 2,
        }
    )
    with pytest.raises(
        FitError, match="split evenly between 2 tasks or data sets .*report each study's folder"
    ):
        incomparable_runs(table)
    assert incomparable_runs(table.iloc[:3])[0] == {
        "c": "on synthetic (4096 images) at 16 px, not on the study's digits at 16 px (2 completed runs)"
    }


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
