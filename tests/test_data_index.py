"""Data at cluster scale: an image folder's list built once (one rank lists, the others read it; a
changed tree is noticed), prepare-data's shards (the folder's samples, order and crops; an unreadable
image reported and skipped; a run from shards resumes bitwise), and splits whose classes differ."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli, env, final_weights, free_port, losses, photo_folder, run_and_signal, run_train

from nepa_scale.config import DataConfig
from nepa_scale.data import ResumableBatchSampler, Skipped, batch_loader, build_dataset
from nepa_scale.errors import DataError


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """train/ and val/ of three classes of real photographs, and one train file that is not an image."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    photo_folder(root / "train", classes=3, per_class=12, size=48)
    photo_folder(root / "val", classes=3, per_class=4, size=48)
    (root / "train" / "class1" / "bad.JPEG").write_bytes(b"not a jpeg" * 20)
    return root


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("shards") / "shards"
    return out, cli("prepare-data", str(photos), str(out), "--samples-per-shard", "8", "--workers", "1")


def same_items(a, b, draws) -> None:
    for index, seed in draws:
        x, y = a[(index, seed)], b[(index, seed)]
        if isinstance(x, Skipped):
            assert isinstance(y, Skipped) and Path(x.path).relative_to(a.root) == Path(y.path).relative_to(
                b.root
            )
        else:
            assert not isinstance(y, Skipped) and x[1] == y[1] and torch.equal(x[0], y[0]), index


def test_prepare_data_reports_and_skips_an_unreadable_image(photos, shards):
    out, result = shards
    assert result.returncode == 0, result.stderr[-2000:]
    assert "49 samples in 7 shards (0 packed before), 0 resized, 1 unreadable (skipped)" in result.stdout
    bad = photos / "train" / "class1" / "bad.JPEG"
    assert f"unreadable (skipped): {bad}: UnidentifiedImageError: cannot identify image file '{bad}'" in (
        result.stdout.splitlines()
    )
    packed = build_dataset(DataConfig(kind="shards", root=str(out)), "train", 16, train=False)
    (position,) = [i for i in range(len(packed)) if packed.unreadable[i]]
    skipped = packed.load(position)[0]
    assert isinstance(skipped, Skipped) and skipped.path == str(out / "train" / "class1" / "bad.JPEG")


def test_the_same_seed_draws_the_same_samples_and_crops_from_the_folder_and_its_shards(photos, shards):
    """Every sample the sampler draws, with its augmentation seed, is the same tensor from the folder
    and from its shards, in a loader with worker processes too (each opens its own shards); with
    --short-side, the shards hold exactly resize-data's bytes."""
    from nepa_scale.data.prepare import prepare_data
    from nepa_scale.data.resize import resize_dataset

    folder = build_dataset(DataConfig(kind="imagefolder", root=str(photos)), "train", 16, train=True)
    packed = build_dataset(DataConfig(kind="shards", root=str(shards[0])), "train", 16, train=True)
    assert (packed.classes, packed.labels.tolist()) == (folder.classes, folder.labels.tolist())
    sampler = ResumableBatchSampler(len(folder), global_batch=8, micro_batch=4, seed=3)
    sampler.set_position(epoch=1)
    draws = [draw for batch in sampler for draw in batch]
    same_items(folder, packed, draws)
    loaded = [batch_loader(d, sampler, num_workers=2, seed=3, pin_memory=False) for d in (folder, packed)]
    for a, b in zip(*loaded, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert len(a.skipped) == len(b.skipped)

    base = shards[0].parent
    resize_dataset(photos, base / "resized", short_side=32)
    prepare_data(photos, base / "small", short_side=32, samples_per_shard=16)
    small = build_dataset(DataConfig(kind="imagefolder", root=str(base / "resized")), "train", 16, train=True)
    small_packed = build_dataset(DataConfig(kind="shards", root=str(base / "small")), "train", 16, train=True)
    same_items(small, small_packed, draws)
    assert small_packed.read_bytes(0) == small.read_bytes(0)


def test_prepare_data_resumes_a_lost_shard_and_refuses_other_settings(photos, shards):
    from nepa_scale.data.prepare import prepare_data

    out = shards[0]
    lost = out / "train" / "shard-000001.tar"
    before = lost.read_bytes()
    lost.unlink()
    again = prepare_data(photos, out, samples_per_shard=8)
    assert again.already_done == 6 and again.shards == 7 and lost.read_bytes() == before
    with pytest.raises(ValueError, match="was packed with .* choose a new destination"):
        prepare_data(photos, out, short_side=32, samples_per_shard=8)


def test_the_list_has_the_files_and_order_the_folder_listing_had(tmp_path):
    """The stored list is what ImageFolderDataset listed before it existed: class folders sorted
    (links followed), files sorted, image suffixes in any case, nothing else."""
    from nepa_scale.data.index import IMAGE_EXTENSIONS, list_folder

    root = tmp_path / "train"
    for name in ("b", "a", "C", "a.jpg"):
        (root / name).mkdir(parents=True)
    for relative in ("a/z.JPEG", "a/y.png", "a/.hidden.jpg", "a/notes.txt", "a/noext", "b/x.Jpg", "b/w.tiff"):
        (root / relative).write_bytes(b"x")
    (root / "a" / "sub.jpeg").mkdir()  # listed as before (and skipped when read)
    (root / "link").symlink_to(root / "b")
    (root / "top.jpg").write_bytes(b"x")  # not in a class folder
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())  # the listing before the index
    before = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    index = list_folder(root)
    assert list(index.classes) == classes == ["C", "a", "a.jpg", "b", "link"]
    assert [(index.path(i), int(label)) for i, label in enumerate(index.labels)] == before
    assert all(size == 1 for (path, _), size in zip(before, index.sizes, strict=True) if Path(path).is_file())


def test_sweep_plan_warns_once_when_many_runs_read_an_unpacked_folder(tmp_path):
    import yaml

    from nepa_scale.launch.sweep import load_sweep

    def sweep(kind: str):
        spec = {
            "name": "study",
            "base": str(REPO / "configs" / "digits_tiny.yaml"),
            "set": {"data.kind": kind, "data.root": str(tmp_path / "data")},
            "axes": [{"grid": {"seed": [0, 1, 2, 3]}}],
            "profile": "cpu",
            "output_root": str(tmp_path / "runs"),
        }
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return load_sweep(path)

    warnings = [w for w in sweep("imagefolder").warnings if "file by file" in w]
    assert warnings == [
        f"4 runs read the image folder {tmp_path / 'data'} file by file (data.kind=imagefolder): on a shared "
        f"file system pack it once (nepa-scale prepare-data {tmp_path / 'data'} DST) and train from the shards "
        "(data.kind=shards data.root=DST; docs/recipe.md)"
    ]
    assert not [w for w in sweep("shards").warnings if "file by file" in w]


RANK_SCRIPT = """
import json, sys, torch.distributed as dist
import nepa_scale.data.index as index
calls = []
listed = index.list_folder
index.list_folder = lambda root: calls.append(str(root)) or listed(root)
dist.init_process_group("gloo")
from pathlib import Path
from nepa_scale.config import DataConfig
from nepa_scale.data import build_dataset
config = DataConfig(kind="imagefolder", root=sys.argv[1], index_dir=sys.argv[2])
added = Path(sys.argv[1]) / "train" / "class2" / "new.JPEG"
rank, phases = dist.get_rank(), []
for phase in ("first run", "next run", "file added", "file removed"):
    if phase == "file added" and rank == 0:
        added.write_bytes((added.parent / "img000.JPEG").read_bytes())
    if phase == "file removed" and rank == 0:
        added.unlink()
    dist.barrier()
    if phase != "file removed":  # a new run: nothing remembered (the last phase checks within a run)
        index._MEMO.clear()
    calls.clear()
    train = build_dataset(config, "train", 16, train=False)
    build_dataset(config, "val", 16, train=False)
    phases.append([len(calls), len(train), train.index.digest()])
    print(f"phase {phase} done", file=sys.stderr, flush=True)
print(json.dumps(phases))
"""


def test_one_rank_lists_the_folder_and_a_changed_tree_is_listed_again_saying_so(photos, tmp_path):
    """In a two-process run (gloo) rank 0 walks each split once and rank 1 reads the stored list; the
    next run walks nothing; a file added or removed since is noticed (one line naming the folder)."""
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    index_dir = tmp_path / "index"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(root), str(index_dir)],
            env=env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for rank in range(2)
    ]
    (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], (err0[-2000:], err1[-2000:])
    rank0, rank1 = json.loads(out0), json.loads(out1)
    assert [walks for walks, _, _ in rank0] == [2, 0, 1, 1]  # train and val; none; train; train
    assert [walks for walks, _, _ in rank1] == [0, 0, 0, 0]
    assert [size for _, size, _ in rank0] == [size for _, size, _ in rank1] == [37, 37, 38, 37]
    assert [digest for *_, digest in rank0] == [digest for *_, digest in rank1]
    log = (index_dir / "listings.log").read_text().splitlines()
    assert len(log) == 4 and all(" rank 0: listed " in line for line in log)
    notices = [line for line in err0.splitlines() if "changed since it was indexed" in line]
    assert notices == [
        f"data: {root / 'train'} changed since it was indexed (1 file(s) added, e.g. class2/new.JPEG); listed again",
        f"data: {root / 'train'} changed since it was indexed (1 file(s) removed, e.g. class2/new.JPEG); listed again",
    ]
    assert "changed" not in err1


def test_splits_whose_class_folders_differ_are_refused(photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    shutil.rmtree(root / "val" / "class1")
    config = DataConfig(kind="imagefolder", root=str(root), index_dir=str(tmp_path / "index"))
    with pytest.raises(DataError) as refused:
        build_dataset(config, "val", 16, train=False)
    assert str(refused.value) == (
        f"data: {root}: the class folders of val/ and train/ differ (val lacks class1): labels are numbered by "
        "class folder, so they would not match; give both splits the same class folders"
    )
    (root / "val" / "class2").rename(root / "val" / "class9")
    with pytest.raises(DataError, match=r"\(val lacks class1, class2; val has class9, which train has not\)"):
        build_dataset(config, "val", 16, train=False)


# A tiny model on the 37 training photographs at 16 px: 4 steps of 8 images an epoch, 12 steps.
RUN = ["budget.global_batch=8", "budget.images=96", "checkpoint.every=4", "logging.eval_every=6"]


@pytest.fixture(scope="module")
def folder_run(photos, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "folder"
    result = run_train(run_dir, "data.kind=imagefolder", f"data.root={photos}", *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_run_from_shards_is_its_folders_run_and_resumes_bitwise_after_preemption(
    folder_run, shards, tmp_path
):
    run_dir, data = tmp_path / "shards", ["data.kind=shards", f"data.root={shards[0]}", *RUN]
    cut = run_and_signal(run_dir, *data, at_step=5)
    assert cut.returncode == 75, cut.stderr[-3000:]
    resumed = run_train(run_dir, *data)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "completed" and info["restarts"][-1]["from_step"] >= 5
    assert info["data_resized"]["copy"] == str(shards[0]) and info["data_resized"]["short_side"] is None
    assert info["skipped_files"] == [str(shards[0] / "train" / "class1" / "bad.JPEG")]
    a, b = losses(folder_run), losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, 13)) and all(a[s] == b[s] for s in a), (a, b)
    wa, wb = final_weights(folder_run), final_weights(run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_probe_refuses_data_whose_splits_differ(folder_run, photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    shutil.rmtree(root / "val" / "class2")
    result = cli("probe", str(folder_run), "--data", "kind=imagefolder", f"root={root}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("nepa-scale: error: data: ") and "(val lacks class2)" in lines[-1]
    assert not os.path.exists(folder_run / "probes" / "step_00000012.json")
