"""Nothing read from a run directory runs code: a crafted pickle put into each file a run holds (its
content kept, its checkpoint's manifest updated, as an attacker would) is refused by export, probe,
resume and fine-tune in one line naming the file, and its payload never runs.

One small ZeRO-1 run with an EMA (model states, optimizer states, EMA, RNG file) is trained once;
each case tampers with a copy of it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DIGITS_CONFIG, REPO, SMALL, run_train

from nepa_scale.cli import main
from nepa_scale.engine import checkpoint_store as store
from nepa_scale.engine import safe_load
from nepa_scale.engine.export import export_run
from nepa_scale.errors import CheckpointError, UnsafePickle
from nepa_scale.rundir import MARKER

FINETUNE_CONFIG = REPO / "configs" / "finetune_digits_tiny.yaml"
PRETRAIN = ["budget.images=64", "deepspeed.zero_stage=1", "checkpoint.ema_decay=0.9"]  # 2 steps
TAG = "step_00000002"
LONGER = ["budget.images=128", "checkpoint.allow_budget_change=true"]  # a resume, not a run already complete


class Payload:
    """What a malicious file holds: unpickling it touches ``marker`` (a harmless stand-in)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trusted") / "run"
    result = run_train(run_dir, *PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    export_run(run_dir)  # what fine-tuning reads
    return run_dir


@pytest.fixture
def run(trusted, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trusted, copy)
    return copy


def recommit(checkpoint: Path) -> None:
    """The manifest rewritten to match the files, as anyone who can write the files can."""
    meta = json.loads((checkpoint / MARKER).read_text())
    (checkpoint / MARKER).write_text(json.dumps({**meta, "files": store.manifest(checkpoint)}))


def plant(file: Path, marker: Path) -> None:
    """Add the payload to ``file``, keeping what it held; a non-torch file becomes a pickle holding it."""
    if file.suffix == ".pt":
        held = torch.load(file, map_location="cpu", weights_only=False)  # the test's own file
        held = held if isinstance(held, dict) else {"held": held}
    else:
        held = {"held": file.read_bytes()}
    torch.save({**held, "payload": Payload(marker)}, file)


def old_rng_file(checkpoint: Path, payload: Payload | None = None) -> Path:
    """The rank's RNG file as the code before JSON wrote it (torch.save of the raw states)."""
    new = store.rng_file(checkpoint, 0)
    saved = json.loads(new.read_text())
    state = {**store.rng_from_json(saved["rng"]), **saved["rank_state"]}
    new.unlink()
    old = store.rng_file(checkpoint, 0, legacy=True)
    torch.save({**state, **({"payload": payload} if payload else {})}, old)
    return old


def refused(code: int, stderr: str, file: Path, exit_code: int = 1) -> str:
    """The single error line of a refusal naming ``file``."""
    errors = [line for line in stderr.splitlines() if line.startswith("nepa-scale: error:")]
    assert code == exit_code and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert str(file) in errors[0], errors[0]
    return errors[0]


def in_process(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err


def resume(run_dir: Path) -> tuple[int, str]:
    done = run_train(run_dir, *PRETRAIN, *LONGER)
    return done.returncode, done.stderr


def tamper(checkpoint: Path, name: str, marker: Path) -> Path:
    """The payload in the checkpoint's file ``name`` (for the RNG file of a checkpoint the code
    before wrote, ``rng_rank00000.pt``: that file, made the old way), its manifest updated."""
    if name == "rng_rank00000.pt":
        file = old_rng_file(checkpoint, Payload(marker))
    else:
        file = checkpoint / name
        plant(file, marker)
    recommit(checkpoint)
    return file


@pytest.mark.parametrize(
    "name",
    ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema.pt", "rng_rank00000.pt"],
)
def test_a_crafted_checkpoint_file_is_refused_by_export_and_probe(run, tmp_path, capsys, name):
    marker = tmp_path / "payload_ran"
    file = tamper(run / "checkpoints" / TAG, name, marker)
    line = refused(*in_process(capsys, "export", str(run), "--out", str(tmp_path / "out")), file)
    assert line == (
        f"nepa-scale: error: refusing to unpickle {file}: it names posix.system (a torch file from a run "
        "directory or a weight file may hold only tensors, plain values and the few classes DeepSpeed's "
        "checkpoints hold: unpickling anything else could run code)"
    )
    refused(*in_process(capsys, "probe", str(run), *(["--ema"] if name == "ema.pt" else [])), file)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_crafted_checkpoint_file_is_refused_on_resume(run, tmp_path):
    """Resume verifies the checkpoint first (the scan of every torch file that export and probe
    make), before the engine is built."""
    marker = tmp_path / "payload_ran"
    file = tamper(run / "checkpoints" / TAG, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    code, stderr = resume(run)
    refused(code, stderr, file)
    assert "resumed from" not in stderr and not marker.exists()


def plan_resume(run_dir: Path) -> None:
    """What ``resume`` does before it builds the engine (the checkpointer's plan), in this process."""
    from nepa_scale.config import load_config
    from nepa_scale.engine.checkpoint import Checkpointer
    from nepa_scale.engine.distributed import World
    from nepa_scale.engine.settings import resolve_step_settings
    from nepa_scale.engine.tasks import PretrainTask
    from nepa_scale.rundir import RunDir

    config = load_config(DIGITS_CONFIG, [*SMALL, *PRETRAIN, *LONGER, f"output_dir={run_dir}"])
    settings = resolve_step_settings(config, PretrainTask.resolve_arch(config), 1, "cpu")
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    Checkpointer(RunDir(run_dir), config, world, settings, total_steps=4).plan_resume()


def test_a_crafted_rng_file_is_refused_unread_on_resume(run, tmp_path):
    """The RNG file is JSON now: a pickle put there is refused, and nothing unpickles it."""
    checkpoint = run / "checkpoints" / TAG
    marker = tmp_path / "payload_ran"
    plant(store.rng_file(checkpoint, 0), marker)
    recommit(checkpoint)
    with pytest.raises(
        CheckpointError, match=f"cannot read {store.rng_file(checkpoint, 0)}: UnicodeDecodeError"
    ):
        plan_resume(run)
    assert not marker.exists()


def test_a_crafted_universal_checkpoint_is_refused_on_resume(run, tmp_path):
    """A resume on another world size reads the checkpoint's universal conversion, made once and
    kept beside it: a crafted file there is refused like one in the checkpoint itself."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    checkpoint = run / "checkpoints" / TAG
    universal = checkpoint.with_name(TAG + store.UNIVERSAL_SUFFIX)
    with safe_load.weights_only_loads(checkpoint):  # as the checkpointer converts
        ds_to_universal(
            argparse.Namespace(
                input_folder=str(checkpoint),
                output_folder=str(universal),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
        )
    store.commit(universal, {"source": TAG})
    meta = json.loads((checkpoint / MARKER).read_text())
    (checkpoint / MARKER).write_text(json.dumps({**meta, "world_size": 2}))  # saved by 2 ranks, resumed on 1
    marker = tmp_path / "payload_ran"
    file = universal / "zero" / "norm.weight" / "fp32.pt"
    plant(file, marker)
    recommit(universal)
    with pytest.raises(UnsafePickle, match=f"refusing to unpickle {file}: it names posix.system"):
        plan_resume(run)
    assert not marker.exists()


def test_finetuning_refuses_a_crafted_export(run, tmp_path):
    """Fine-tuning from a run reads its export/ (safetensors, never unpickled): a pickle put there
    is refused in one line naming it."""
    marker = tmp_path / "payload_ran"
    export = run / "export" / "model.safetensors"
    plant(export, marker)
    common = ["budget.epochs=1", "budget.global_batch=64"]
    done = run_train(tmp_path / "ft", *common, f"finetune.pretrained={run}", config=FINETUNE_CONFIG)
    line = refused(done.returncode, done.stderr, export, exit_code=2)  # a config value that cannot be used
    assert "is not a safetensors file" in line
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_crafted_weight_file_is_refused(tmp_path, suffix):
    """``finetune.pretrained`` / ``segment.pretrained`` naming a weight file: read weights-only."""
    from nepa_scale.models.official import read_state_dict

    marker = tmp_path / "payload_ran"
    weights = tmp_path / f"weights{suffix}"
    torch.save({"blocks.0.norm1.weight": torch.ones(48), "payload": Payload(marker)}, weights)
    error = UnsafePickle if suffix == ".pt" else CheckpointError
    with pytest.raises(error, match=f"{weights}: (it names posix.system|not a safetensors file)") as raised:
        read_state_dict(weights)
    assert len(str(raised.value).splitlines()) == 1 and not marker.exists()


def test_the_old_rng_file_loads_to_the_same_streams_as_the_json_one(trusted, tmp_path):
    """A checkpoint written before the RNG file became JSON resumes with the same streams: its
    pickle is read weights-only with numpy's array allowed, and gives what the JSON file gives."""
    checkpoint = tmp_path / TAG
    shutil.copytree(trusted / "checkpoints" / TAG, checkpoint)
    from_json = store.load_rng(checkpoint, 0)
    old_rng_file(checkpoint)
    from_pickle = store.load_rng(checkpoint, 0)
    assert from_json.keys() == from_pickle.keys() == {"python", "numpy", "torch", "interval"}
    draws = []
    for state in (from_json, from_pickle):
        store.set_rng_state(state)
        draws.append((random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()))
    assert draws[0] == draws[1]
    store.verify(store.Committed(checkpoint, 2, {}))  # its numpy classes pass the scan too


def test_the_loaders_refuse_without_the_scan(trusted, tmp_path):
    """The second line of defence, where the scan is not reached (a file swapped after it): DeepSpeed's
    own loaders, through the replaced checkpoint engine and under ``weights_only_loads``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = tmp_path / TAG
    shutil.copytree(trusted / "checkpoints" / TAG, checkpoint)
    marker = tmp_path / "payload_ran"
    optim = checkpoint / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(optim, marker)
    allowed = torch.serialization.get_safe_globals()
    engine = safe_load.safe_checkpoint_engine()()
    with pytest.raises(UnsafePickle, match=f"refusing to unpickle {optim}: it names posix.system"):
        engine.load(str(optim), map_location="cpu")
    with pytest.raises(UnsafePickle, match="refusing to unpickle a file under .*: it names posix.system"):
        with safe_load.weights_only_loads(checkpoint):
            get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag=TAG)
    # Nothing is left changed: torch's allow-list and the environment are as they were.
    assert torch.serialization.get_safe_globals() == allowed and safe_load.FORCE not in os.environ
    assert not marker.exists()
    # The same file read as DeepSpeed reads it by itself: what all of the above prevents.
    torch.load(optim, weights_only=False)
    assert marker.exists()
