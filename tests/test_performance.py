"""The performance work must not change what is computed: the optimised paths against the reference
paths on the CPU, and ``nepa-scale bench`` timing the real training step with consistent numbers."""

from __future__ import annotations

import copy
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO, env


def test_uint8_loader_with_device_normalisation_gives_the_same_inputs_bitwise():
    """Workers now return uint8 and the device normalises: the model's input is unchanged."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    from timm.data import create_transform

    from nepa_scale.data import AugmentSpec, build_transform, to_model_input
    from nepa_scale.data.datasets import NEPA_MEAN, NEPA_STD

    photo = Image.fromarray(load_sample_images().images[0])
    spec = AugmentSpec(224)
    for train in (True, False):
        reference = create_transform(  # torchvision ToTensor + Normalize in the worker, as before
            224,
            is_training=train,
            color_jitter=None,
            interpolation="bicubic",
            crop_pct=spec.eval_crop_pct,
            mean=NEPA_MEAN,
            std=NEPA_STD,
        )
        ours = build_transform(spec, train=train)
        for seed in range(3):  # the crop draws from python's random, the flip from torch's
            random.seed(seed), torch.manual_seed(seed)
            expected = reference(photo)
            random.seed(seed), torch.manual_seed(seed)
            raw = ours(photo)
            assert raw.dtype == torch.uint8
            got = to_model_input(raw[None], torch.device("cpu"), torch.float32)[0]
            assert torch.equal(got, expected), (train, seed)


def test_device_decoding_draws_the_same_crops_and_flips_and_matches_pil(tmp_path):
    """data.decode=device (here the device is the CPU: the same torchvision calls as nvJPEG's path)
    against PIL in the worker: the same region and flip per sample, pixels within a level or two;
    a PNG and a truncated JPEG take the CPU path, which decodes or skips them."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from nepa_scale.config import DataConfig
    from nepa_scale.data import EncodedJpeg, Skipped, build_dataset, collate
    from nepa_scale.data.device_decode import decode_on_device

    folder = tmp_path / "train" / "photos"
    folder.mkdir(parents=True)
    for i, photo in enumerate(load_sample_images().images * 6):
        h, w = 300 + (i * 37) % 127, 350 + (i * 53) % 290
        Image.fromarray(photo[:h, :w]).save(folder / f"img{i:02d}.jpg", quality=90)
    Image.fromarray(load_sample_images().images[0][:200, :300]).save(folder / "z_png.png")
    truncated = (folder / "img00.jpg").read_bytes()
    (folder / "z_truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    config = DataConfig(kind="imagefolder", root=str(tmp_path))
    on_cpu = build_dataset(config, "train", 224, train=True)
    on_device = build_dataset(config, "train", 224, train=True, decode="device")
    items = [(i, 7 * i + 3) for i in range(len(on_cpu))]
    pending = [on_device[item] for item in items]
    encoded = [isinstance(sample[0], EncodedJpeg) for sample in pending if not isinstance(sample, Skipped)]
    assert encoded.count(True) == 12 and encoded.count(False) == 1  # the PNG, decoded in the worker
    reference = collate([on_cpu[item] for item in items])
    decoded = decode_on_device(collate(pending), torch.device("cpu"), 224)
    assert (
        [s.path for s in decoded.skipped]
        == [s.path for s in reference.skipped]
        == [str(folder / "z_truncated.jpg")]
    )
    assert torch.equal(decoded.labels, reference.labels) and decoded.images.dtype == torch.uint8
    diff = (decoded.images.float() - reference.images.float()).abs()
    assert diff.mean() < 0.5 and diff.flatten().quantile(0.99) <= 2, (diff.mean(), diff.max())
    mirrored = (decoded.images.flip(-1).float() - reference.images.float()).abs().mean(dim=(1, 2, 3))
    assert (diff.mean(dim=(1, 2, 3)) < mirrored / 10).all()  # every flip decision is the same


def test_compiled_blocks_compute_what_the_eager_model_computes():
    """torch.compile of each block (inductor, fp32 on the CPU): one graph shared by every block, no
    graph breaks, the same outputs and gradients as the eager reference."""
    import torch._dynamo.utils

    from nepa_scale.engine.trainer import apply_compile
    from nepa_scale.models import create_model
    from nepa_scale.objective import next_embedding_loss

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = create_model("nepa_tiny", attention="sdpa", dim=48, depth=3, num_heads=2).train()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, "blocks")
    images = torch.randn(8, 3, 16, 16)
    results = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the same RoPE rescale draw
        out = model(images)
        loss = next_embedding_loss(out.prediction, out.target).loss
        loss.backward()
        results.append((out.prediction.detach(), loss.detach(), dict(model.named_parameters())))
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    (pred_e, loss_e, params_e), (pred_c, loss_c, params_c) = results
    torch.testing.assert_close(pred_c, pred_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    assert set(params_c) == set(params_e)  # in-place compile keeps the state-dict keys
    for name, param in params_e.items():
        torch.testing.assert_close(params_c[name].grad, param.grad, rtol=1e-4, atol=1e-7, msg=name)


def bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "bench", "--out", str(tmp_path / "bench.json"), *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )


def test_bench_times_the_real_step_and_its_numbers_agree(tmp_path):
    """DeepSpeed eager, DeepSpeed with compiled blocks, and the plain loop, on the real digits loader."""
    small = ["--override", "dim=48", "--override", "depth=2", "--override", "num_heads=2"]
    out = bench(
        tmp_path,
        *("--models", "nepa_tiny", "--batch", "32", "--data", "digits", "--zero", "2"),
        *("--engine", "deepspeed,plain", "--compile", "none,blocks", "--precision", "fp32"),
        *("--steps", "3", "--repeats", "2", "--warmup", "2", "--profile", "1", *small),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["matmul_peak_tflops"] > 0
    results = {(r["engine"], r["compile"]): r for r in report["results"]}
    assert set(results) == {
        ("deepspeed", "none"),
        ("deepspeed", "blocks"),
        ("plain", "none"),
        ("plain", "blocks"),
    }
    for r in results.values():
        assert "error" not in r, r
        assert len(r["img_per_s_repeats"]) == 2 and r["img_per_s"] > 0
        assert r["params"] < 100_000  # the overrides reached the model
        assert r["tflops_per_s"] == pytest.approx(r["img_per_s"] * r["flops_per_image"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_s"] / report["matmul_peak_tflops"])
        assert r["step_ms"] == pytest.approx(1e3 * 32 / r["img_per_s"])
        # The step is its phases (on the CPU, wall clock). Both averaged over the same timed steps:
        # step_ms is from the median rate, which a load spike in one repeat moves away from the mean.
        mean_step_ms = (
            1e3 * 32 * sum(1 / rate for rate in r["img_per_s_repeats"]) / len(r["img_per_s_repeats"])
        )
        phases = sum(r["phase_ms"].values())
        assert 0.7 * mean_step_ms < phases <= 1.05 * mean_step_ms, (r["phase_ms"], r["img_per_s_repeats"])
        assert all(r["phase_ms"][k] > 0 for k in ("forward", "backward", "optimizer"))
        assert r["loader_img_per_s"] > 0 and math.isfinite(r["loss_last"])
        assert r["graph_breaks"] == 0
        profiled = r["profile"]  # one more step under torch.profiler: host operators on the CPU
        assert profiled["profiled_steps"] == 1 and profiled["device_busy"] is None
        assert len(profiled["top"]) == 8 and all(ms >= 0 for _, ms in profiled["top"])
    # compile took effect under DeepSpeed (one graph for both blocks) and changed nothing it computes
    assert results[("deepspeed", "blocks")]["compiled_graphs"] == 1
    assert results[("deepspeed", "none")]["compiled_graphs"] == 0
    for engine in ("deepspeed", "plain"):
        compiled, eager = results[(engine, "blocks")], results[(engine, "none")]
        assert compiled["loss_last"] == pytest.approx(eager["loss_last"], rel=1e-4)
    # the plain loop trains the same model with the same optimizer and schedule (fp32 here)
    ds, plain = results[("deepspeed", "none")], results[("plain", "none")]
    assert plain["loss_last"] == pytest.approx(ds["loss_last"], rel=1e-5)
    assert results[("deepspeed", "none")]["predicted_memory_gb"] > 0
    assert results[("plain", "none")]["predicted_memory_gb"] is None
    assert "img/s" in out.stdout and "written:" in out.stdout and "profile nepa_tiny plain" in out.stdout


@pytest.mark.parametrize("check_grad_overflow", [False, True])
def test_bf16_overflow_check_is_off_unless_asked_for(tmp_path, check_grad_overflow):
    """DeepSpeed's bf16 overflow check (its default) tests every gradient and then waits for the
    device, every step: on an H100 that left the GPU idle half of each ZeRO-2 step
    (docs/performance.md). bf16 needs no loss scaling and a non-finite loss stops the run, so it is
    off unless ``deepspeed.check_grad_overflow`` asks for it; either way the step updates the weights."""
    from torch.profiler import profile

    from nepa_scale.bench.case import BenchCase, case_config
    from nepa_scale.engine.trainer import Trainer

    case = BenchCase(model="nepa_tiny", micro_batch=4, zero_stage=2, precision="bf16")
    config = case_config(case, str(tmp_path))
    config.optim.lr, config.optim.warmup_fraction = 1e-2, 0.0  # a step large enough to move bf16 weights
    config.deepspeed.check_grad_overflow = check_grad_overflow
    trainer = Trainer(config)
    engine, _, _ = trainer.build_engine(resume=False)
    size = trainer.arch.image_size
    loss, _ = trainer.task.micro_step(engine, torch.randn(4, 3, size, size, dtype=torch.bfloat16), None)
    engine.backward(loss)
    before = [p.detach().clone() for p in engine.module.parameters()]
    with profile() as prof:
        engine.step()
    finiteness_tests = sum(e.count for e in prof.key_averages() if e.key == "aten::isfinite")
    if check_grad_overflow:
        assert finiteness_tests >= len(before), finiteness_tests  # every gradient tested
    else:
        assert finiteness_tests < len(before) // 4, finiteness_tests  # a few on the norm, none per gradient
    after = list(engine.module.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True)) > len(before) // 2


def test_communication_model_counts_what_deepspeed_sends(tmp_path):
    """ZeRO-1, 2 and 3 in a real 2-process gloo run with DeepSpeed's communication logger on: the
    bytes per step of every collective within 5% of nepa_scale/comm.py's count (what ``sweep plan``
    times), with bf16 gradients, two micro-batches per step, gradient buckets smaller than the
    model, and ZeRO-3 also with a reuse distance short enough that the first block's parameters
    are gathered again in backward. The measurement itself shows what the model is about."""
    from tests.helpers import SMALL, free_port

    out, port = tmp_path / "comm.json", str(free_port())
    reuse = "3:deepspeed.extra.zero_optimization.stage3_max_reuse_distance=59232"  # the model's size
    cmd = [sys.executable, str(REPO / "benchmarks" / "comm_bytes.py"), "--out", str(out), "--stages"]
    cmd += [f"1,2,3,{reuse}", SMALL[0]]
    cmd += ["budget.global_batch=32", "budget.micro_batch=8", "deepspeed.precision=bf16"]
    cmd += ["deepspeed.reduce_bucket_size=20000", "deepspeed.overlap_comm=true"]
    ranks = [
        subprocess.Popen(
            cmd,
            env=env(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for r in range(2)
    ]
    logs = [rank.communicate(timeout=600)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs[0][-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == [] and report["tolerance"] == 0.05
    *results, regathered = report["results"]
    results = {r["zero_stage"]: r for r in results}
    assert sorted(results) == [1, 2, 3] and results[1]["accumulation_steps"] == 2
    sent = {stage: r["measured_per_step"] for stage, r in results.items()}
    gradients = 2 * results[1]["params"]  # bf16
    assert sent[1]["all_reduce"]["bytes"] == pytest.approx(gradients, rel=0.01)  # once per step
    assert sent[2]["all_reduce"]["bytes"] == pytest.approx(2 * gradients, rel=0.01)  # every micro-batch
    assert sent[3]["reduce_scatter_tensor"]["bytes"] == pytest.approx(2 * gradients, rel=0.01)
    assert sent[3]["all_reduce"]["bytes"] < 1024  # scalars only
    assert sent[1]["all_reduce"]["calls"] >= 3  # more than one bucket: 59k gradients, 20k per bucket
    # the first block (but its last MLP layer) gathered again: a third more than once per micro-batch
    again = regathered["measured_per_step"]["all_gather_into_tensor"]["bytes"]
    assert 1.3 < again / sent[3]["all_gather_into_tensor"]["bytes"] < 1.4


def test_float8_converts_the_block_linears_and_trains_through_the_engine(tmp_path):
    """``model.float8`` (torchao, opt-in): the blocks' linear layers compute in float8 with the same
    parameters and state-dict keys, outputs close to the bf16 model's; a bench case (``--set``)
    builds it through the trainer and DeepSpeed and takes a step. CPU float8 is an emulation
    (seconds per small matmul), so the sizes are tiny; the loss over a run is a GPU check."""
    from torchao.float8.float8_linear import Float8Linear

    from nepa_scale.bench.case import BenchCase, case_config
    from nepa_scale.engine.distributed import merged
    from nepa_scale.engine.trainer import Trainer, apply_float8
    from nepa_scale.models import NEPA, get_arch

    arch = get_arch("nepa_tiny", dim=32, depth=1, num_heads=2, image_size=8)
    torch.manual_seed(0)
    plain, converted = NEPA(arch, attention="math").eval(), NEPA(arch, attention="math").eval()
    converted.load_state_dict(plain.state_dict())
    assert apply_float8(converted) == 4  # qkv, proj, fc1, fc2; the patch embedding stays
    assert list(converted.state_dict()) == list(plain.state_dict())
    images = torch.randn(2, 3, 8, 8)
    a, b = plain(images).prediction, converted(images).prediction
    assert (
        not torch.equal(a, b)
        and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    )

    overrides = ("dim=32", "depth=1", "num_heads=2", "image_size=8")
    case = BenchCase(
        model="nepa_tiny",
        micro_batch=2,
        overrides=overrides,
        settings=("model.float8=true", "optim.warmup_fraction=0"),
    )
    trainer = Trainer(case_config(case, str(tmp_path)))
    engine, _, _ = trainer.build_engine(resume=False)
    assert isinstance(engine.module.blocks[0].mlp.fc1, Float8Linear)
    before = [p.detach().clone() for p in engine.module.parameters()]
    trainer.train_step(engine, trainer.batches(0), 0)
    assert any(not torch.equal(p, q) for p, q in zip(engine.module.parameters(), before, strict=True))
    # deepspeed.extra adds to a generated section rather than replacing it
    zero = merged({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"overlap_comm": True}})
    assert zero == {"zero_optimization": {"stage": 2, "overlap_comm": True}}


def test_device_profile_counts_idle_gaps_and_compiled_kernels():
    """The GPU profile's arithmetic (the GPU run is rare): overlapping kernels count once, gaps count
    as idle, inductor's triton kernels are the compiled share."""
    from nepa_scale.bench.device import device_profile, merged_length

    assert merged_length([]) == 0
    assert merged_length([(0, 10), (20, 30)]) == 20  # a gap: idle device
    assert merged_length([(0, 10), (5, 15), (6, 8), (30, 31)]) == 16  # two streams overlap
    assert merged_length([(5, 8), (0, 10)]) == 10
    ms = 1_000_000  # ns
    kernels = [  # two steps: a gemm, a fused triton kernel overlapping it on another stream, a gap
        ("sm90_xmma_gemm_bf16", 0, 6 * ms),
        ("triton_poi_fused_add_mul_0", 4 * ms, 4 * ms),
        ("sm90_xmma_gemm_bf16", 10 * ms, 6 * ms),
        ("triton_poi_fused_add_mul_0", 16 * ms, 4 * ms),
    ]
    profiled = device_profile(kernels, steps=2)
    assert profiled["device_busy"] == pytest.approx(18 / 20)  # busy 0-8 and 10-20 of 0-20
    assert profiled["device_ms_per_step"] == pytest.approx(10)
    assert profiled["kernels_per_step"] == 2
    assert profiled["compiled_kernel_share"] == pytest.approx(8 / 20)
    assert profiled["top"] == [["sm90_xmma_gemm_bf16", 6.0], ["triton_poi_fused_add_mul_0", 4.0]]
    assert device_profile([], steps=1)["device_busy"] is None


@pytest.mark.parametrize(
    "args, key",
    [
        (["--engine", "warp"], "--engine"),
        (["--profile", "-1"], "--profile"),
        (["--models", "nepa_x99"], "model.name"),
        (["--data", "/nonexistent/imagenet"], "--data"),
        (["--decode", "device"], "data.decode: device needs data.kind=imagefolder"),
    ],
)
def test_bench_rejects_bad_options_in_one_line(tmp_path, args, key):
    out = bench(tmp_path, *args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and key in lines[0], out.stderr
    assert not (tmp_path / "bench.json").exists()


def test_checkpointing_some_blocks_changes_no_gradient():
    """Activation checkpointing of none, the first block, or all: the same loss and gradients."""
    from nepa_scale.models import create_model
    from nepa_scale.objective import next_embedding_loss

    images = torch.randn(4, 3, 16, 16)
    grads = []
    for setting, expected in ((False, 0), (1, 1), (True, 3)):
        torch.manual_seed(0)
        model = create_model(
            "nepa_tiny", attention="sdpa", dim=48, depth=3, num_heads=2, grad_checkpointing=setting
        )
        assert model.checkpointed_blocks == expected
        out = model.train()(images)
        next_embedding_loss(out.prediction, out.target).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for other in grads[1:]:
        assert all(torch.equal(other[name], grad) for name, grad in grads[0].items())


def test_auto_checkpointing_takes_the_fewest_blocks_that_fit():
    """The memory model per number of checkpointed blocks, and the choice ``auto`` makes from it."""
    from nepa_scale.memory import blocks_to_checkpoint, estimate_memory
    from nepa_scale.models.zoo import count_params, get_arch

    arch = get_arch("nepa_l14")
    params = count_params(arch)["total"]
    setting = dict(micro_batch=128, precision="bf16", zero_stage=2, world_size=1)
    peaks = [
        estimate_memory(arch, params, grad_checkpointing=k, **setting).peak_gb for k in range(arch.depth + 1)
    ]
    # each checkpointed block saves memory, except the last: backward needs its activations at once
    assert all(a > b for a, b in zip(peaks[:-1], peaks[1:-1], strict=False)) and peaks[-1] > peaks[-2]
    assert peaks[0] == estimate_memory(arch, params, grad_checkpointing=False, **setting).peak_gb
    assert peaks[-1] == estimate_memory(arch, params, grad_checkpointing=True, **setting).peak_gb
    assert peaks[-1] < 0.5 * peaks[0]
    assert blocks_to_checkpoint(arch, params, memory_gb=80.0, **setting)[0] == 0  # 38 GiB fits an H100
    target = (peaks[9] + peaks[10]) / 2 / 0.9  # room for 10 checkpointed blocks, not for 9
    chosen, estimate = blocks_to_checkpoint(arch, params, memory_gb=target, **setting)
    assert chosen == 10 and estimate.peak_gb == peaks[10]
    assert blocks_to_checkpoint(arch, params, memory_gb=1.0, **setting)[0] == arch.depth  # nothing fits


def test_resized_copy_keeps_every_file_and_only_shrinks_the_pixels(tmp_path):
    """``nepa-scale resize-data``: the same relative files (so the same samples, classes and order),
    large images at the short side, everything else byte for byte; resumable; never over its source."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from nepa_scale.data import ImageFolderDataset, Skipped
    from nepa_scale.data.resize import MANIFEST, resize_dataset

    photo = load_sample_images().images[0]  # 427 x 640
    src, dst = tmp_path / "imagenet", tmp_path / "imagenet-256"
    folder = src / "train" / "n01"
    folder.mkdir(parents=True)
    Image.fromarray(photo).save(folder / "big.JPEG", quality=95)
    Image.fromarray(photo[:200, :150]).save(folder / "small.jpg", quality=95)
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(photo[:300, :400]).convert("RGBA").save(folder / "alpha.png")
    (folder / "garbage.jpg").write_bytes(b"not an image")
    big = (folder / "big.JPEG").read_bytes()
    (folder / "truncated.jpg").write_bytes(big[: len(big) // 2])
    (src / "val" / "n02").mkdir(parents=True)
    Image.fromarray(photo[:, ::-1]).save(src / "val" / "n02" / "v.jpg")
    (src / "LABELS.txt").write_text("n01 tench\n")
    source_bytes = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}

    out = subprocess.run(
        [sys.executable, "-m", "nepa_scale.cli", "resize-data", str(src), str(dst), "--short-side", "256"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "4 resized, 2 copied as they were, 2 unreadable" in out.stdout, out.stdout

    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)

    assert files(dst) == files(src)
    for name in ("small.jpg", "garbage.jpg", "truncated.jpg"):
        assert (dst / "train" / "n01" / name).read_bytes() == (folder / name).read_bytes()
    assert (dst / "LABELS.txt").read_bytes() == (src / "LABELS.txt").read_bytes()
    with Image.open(dst / "train" / "n01" / "big.JPEG") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (384, 256))
        with Image.open(folder / "big.JPEG") as source:  # bicubic, then JPEG quality 90: nothing else
            source.resize((384, 256), Image.BICUBIC).save(encoded := io.BytesIO(), format="JPEG", quality=90)
        assert np.array_equal(np.asarray(img), np.asarray(Image.open(encoded)))
    with Image.open(dst / "train" / "n01" / "alpha.png") as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (341, 256))
    with Image.open(dst / "train" / "n01" / "cmyk.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (384, 256))

    # the lists stored elsewhere: the source stays as it was (by default they go beside the data)
    ours = ImageFolderDataset(dst / "train", None, index_dir=tmp_path / "index")
    theirs = ImageFolderDataset(src / "train", None, index_dir=tmp_path / "index")
    assert [(Path(p).name, label) for p, label in ours.samples] == [
        (Path(p).name, label) for p, label in theirs.samples
    ]
    skipped = [
        Path(path).name for i, (path, _) in enumerate(ours.samples) if isinstance(ours.load(i)[0], Skipped)
    ]
    assert sorted(skipped) == ["garbage.jpg", "truncated.jpg"]  # the loader still reports them

    # resumable: a lost file and a half-written leftover are redone, the rest is left alone
    (dst / "train" / "n01" / "big.JPEG").unlink()
    (dst / "train" / "n01" / ".big.JPEG.part").write_bytes(b"half")
    untouched = (dst / "val" / "n02" / "v.jpg").stat().st_mtime_ns
    again = resize_dataset(src, dst, 256)
    assert (again.resized, again.copied, again.already_done) == (1, 0, 7)
    assert (dst / "val" / "n02" / "v.jpg").stat().st_mtime_ns == untouched
    with Image.open(dst / "train" / "n01" / "big.JPEG") as img:
        assert img.size == (384, 256)

    before = files(dst)
    for target, short_side, message in (
        (dst, 224, "was resized with"),  # other settings into the same copy
        (src / "train" / "small", 256, "overlaps the source"),
        (src.parent, 256, "overlaps the source"),
        (src / "val", 256, "overlaps the source"),
        (tmp_path / "missing" / "x", 0, "--short-side"),
    ):
        with pytest.raises(ValueError, match=message):
            resize_dataset(src, target, short_side)
    (tmp_path / "someone-elses").mkdir()
    (tmp_path / "someone-elses" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        resize_dataset(src, tmp_path / "someone-elses", 256)
    assert files(dst) == before
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == source_bytes
    assert (tmp_path / "someone-elses" / "notes.txt").read_text() == "keep"
