"""Fine-tuning: layer-wise lr decay, and the recipe run for real on the digits (accuracy, exact resume, frozen stem)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, final_weights, losses, metrics, run_and_signal, run_train
from safetensors.torch import load_file

from nepa_scale.config import RunConfig
from nepa_scale.engine.tasks import FinetuneTask
from nepa_scale.models import NEPA

FINETUNE_CONFIG = REPO / "configs" / "finetune_digits_tiny.yaml"


def test_layer_decay_assigns_the_formula_lr_to_each_block():
    config = RunConfig(task="finetune", budget={"epochs": 1})
    config.finetune.num_classes, config.finetune.layer_decay = 10, 0.65
    arch = FinetuneTask.resolve_arch(config)
    fake_context = SimpleNamespace(config=config, arch=arch, run=SimpleNamespace(root=Path("/nonexistent")))
    task = FinetuneTask(fake_context)
    model = NEPA(arch)
    model.patch_embed.requires_grad_(False)
    groups = task.optimizer_groups(model, peak_lr=1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    depth, decay = arch.depth, 0.65
    # timm's layer ids (as for its own ViT): 0 = [CLS] and patch embedding, 1..depth = blocks (the final
    # norm grouped with the last block), depth+1 = fc_norm and head; lr = peak * decay^(depth+1 - id).
    for i, block in enumerate(model.blocks):
        for param in block.parameters():
            assert lr_of[id(param)] == pytest.approx(1e-3 * decay ** (depth - i))
    assert lr_of[id(model.cls_token)] == pytest.approx(1e-3 * decay ** (depth + 1))
    for param in model.norm.parameters():
        assert lr_of[id(param)] == pytest.approx(1e-3 * decay)
    for param in (*model.fc_norm.parameters(), *model.head.parameters()):
        assert lr_of[id(param)] == pytest.approx(1e-3)
    assert not any(id(p) in lr_of for p in model.patch_embed.parameters())  # frozen: not optimised
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.head.bias) in no_decay and id(model.blocks[0].ls1.gamma) in no_decay
    assert id(model.head.weight) not in no_decay
    assert arch.causal is False and arch.num_classes == 10 and arch.drop_path == 0.1


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ft") / "study" / "pretrain"  # a study of one run
    result = run_train(run_dir, "budget.images=1920", "logging.log_every=10", "checkpoint.ema_decay=0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    from nepa_scale.engine.export import export_run

    export_run(run_dir)
    return run_dir


FT = ["budget.epochs=6", "budget.global_batch=64", "logging.log_every=1", "optim.lr=5e-3"]


@pytest.mark.slow
def test_finetuning_improves_resumes_exactly_and_keeps_the_stem_frozen(pretrained, tmp_path):
    common = [*FT, f"finetune.pretrained={pretrained}"]
    full_dir = pretrained.parent.parent / "study_finetune" / "full"  # where sweep attach puts it
    full = run_train(full_dir, *common, config=FINETUNE_CONFIG)
    assert full.returncode == 0, full.stderr[-3000:]
    evals = metrics(full_dir, "eval")
    assert [e["step"] for e in evals] == [24, 48, 72, 96, 120, 144]  # every epoch (24 steps of 64 images)
    assert evals[-1]["val_acc"] > evals[0]["val_acc"] + 0.1, [e["val_acc"] for e in evals]
    assert "val_acc_ema" in evals[-1]
    best = json.loads((full_dir / "best_ema.json").read_text())
    assert best["val_acc_ema"] == max(e["val_acc_ema"] for e in evals)
    assert (full_dir / "best_ema.safetensors").exists()
    from nepa_scale.scaling.collect import collect

    row = collect(pretrained.parent).query("eval_point == 'final'").iloc[0]  # the study's table
    assert row["ft_acc"] == evals[-1]["val_acc"] and row["ft_error"] == 1 - evals[-1]["val_acc"]
    assert row["ft_runs"] == 1

    source = load_file(str(pretrained / "export" / "model.safetensors"))
    tuned = final_weights(full_dir)
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert torch.equal(tuned[key], source[key]), key  # frozen patch embedding
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert torch.count_nonzero(tuned["head.weight"]) > 0  # the zero-initialised head learned

    cut = run_and_signal(tmp_path / "cut", *common, at_step=30, config=FINETUNE_CONFIG)  # mid-epoch 2
    assert cut.returncode == 75, cut.stderr[-3000:]
    resumed = run_train(tmp_path / "cut", *common, config=FINETUNE_CONFIG)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(full_dir), losses(tmp_path / "cut")
    assert a == b, [(s, a[s], b.get(s)) for s in a if a[s] != b.get(s)][:5]
    wa, wb = tuned, final_weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [e["val_acc"] for e in metrics(tmp_path / "cut", "eval")] == [e["val_acc"] for e in evals]


def test_few_labels_take_each_class_evenly_and_the_same_images_every_time():
    from nepa_scale.data import build_dataset, few_labels

    config = RunConfig(task="finetune", budget={"epochs": 1})
    full = build_dataset(config.data, "train", 16, train=False)
    subset = few_labels(full, 0.1)
    again = few_labels(build_dataset(config.data, "train", 16, train=False), 0.1)
    assert subset.indices == again.indices
    labels = [full.labels[i] for i in subset.indices]
    per_class = {c: labels.count(c) for c in range(10)}
    # every class keeps a tenth of its ~157 training images, rounded
    expected = {c: round(0.1 * full.labels.count(c)) for c in range(10)}
    assert per_class == expected and len(subset) == sum(expected.values())
    image, label = subset[(3, 3)]
    assert label == full.labels[subset.indices[3]] and torch.equal(image, full[(subset.indices[3], 3)][0])
    assert few_labels(full, 1.0) is full


def test_held_out_evaluation_covers_the_whole_split_not_only_whole_batches():
    """The val sampler yields whole steps; the evaluator adds the remainder (229 digits, batches of 64)."""
    from nepa_scale.engine.distributed import World
    from nepa_scale.engine.evaluator import Evaluator
    from nepa_scale.engine.settings import StepSettings

    config = RunConfig(task="finetune", budget={"epochs": 1})
    world = World(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    settings = StepSettings(
        "fp32", micro_batch=64, accumulation_steps=1, checkpointed_blocks=0, predicted_memory_gb=None
    )
    evaluator = Evaluator(config, FinetuneTask.resolve_arch(config), world, settings)
    labels = evaluator.val_set.labels
    assert len(labels) % 64  # the split is not a whole number of batches

    def mean_label(_out, batch):
        return {"label": batch.labels.float().mean(), "squared": batch.labels.float().pow(2).mean()}

    whole = evaluator.held_out(torch.nn.Identity(), mean_label, limit=None)
    assert whole["label"].item() == pytest.approx(
        sum(labels) / len(labels), rel=1e-6
    )  # each batch mean is fp32
    assert whole["squared"].item() == pytest.approx(
        sum(x * x for x in labels) / len(labels), rel=1e-6
    )  # each batch mean is fp32
    first_two = evaluator.held_out(torch.nn.Identity(), mean_label, limit=2)
    assert first_two["label"].item() == pytest.approx(
        sum(labels[:128]) / 128, rel=1e-6
    )  # each batch mean is fp32


def test_ema_warmup_follows_the_weights_early_and_reaches_the_set_decay():
    from nepa_scale.engine.ema import Ema

    model = torch.nn.Linear(3, 2)
    plain, warm = Ema(model, 0.99), Ema(model, 0.99, warmup=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    plain.update(model, 0)
    warm.update(model, 0)
    assert torch.equal(warm.shadow["weight"], model.weight)  # the first update takes the weights
    assert torch.allclose(plain.shadow["weight"], model.weight - 0.99)  # 99% still the initial weights
    assert warm.decay_at(9) == pytest.approx(1 - 10 ** (-2 / 3))  # timm ModelEmaV3's schedule
    assert warm.decay_at(10_000) == 0.99 and plain.decay_at(0) == 0.99


def test_digits_are_read_as_scikit_learn_reads_them():
    from sklearn.datasets import load_digits

    from nepa_scale.data.datasets import load_digits_file

    pixels, labels = load_digits_file()
    reference = load_digits()
    assert np.array_equal(pixels, reference.images) and np.array_equal(labels, reference.target)


def test_a_study_attaches_the_papers_fine_tunes_with_each_models_recipe(tmp_path):
    """sweeps/scaling_imagenet_wsd.yaml's attach.finetune: one fine-tune per completed run of the two
    longest budgets, with the source's shape and seed, the recipe's own model settings, and the
    released L recipe for L and H (per_model); runs of other budgets are not fine-tuned."""
    from nepa_scale.launch.sweep import load_sweep
    from nepa_scale.rundir import RunDir, RunRecord
    from nepa_scale.workflows.attach import attached_sweep

    study = load_sweep(REPO / "sweeps" / "scaling_imagenet_wsd.yaml", output_root=tmp_path / "study")
    for run in study.runs:  # every pretraining run recorded as completed (the fine-tunes' sources)
        RunDir(run.run_dir).write_record(RunRecord(status="completed", config=run.config_data))
    attached = attached_sweep(study, "finetune")
    longest = {204986720, 819946880}
    sources = [run for run in study.runs if run.config.budget.images in longest]
    assert len(attached.runs) == len(sources) == 2 * (2 * 3 + 2)  # S and B with 3 seeds, L and H with 1
    assert attached.output_root == tmp_path / "study_finetune"
    by_source = {run.config.finetune.pretrained: run.config for run in attached.runs}
    for source in sources:
        config = by_source[str(source.run_dir)]
        assert config.task == "finetune" and config.seed == source.config.seed
        assert config.model.name == source.config.model.name
        assert config.model.overrides == {"qk_norm_affine": True, **source.config.model.overrides}
        large = source.config.model.name in ("nepa_l14", "nepa_h14")
        assert config.finetune.layer_decay == (0.75 if large else 0.65)
        assert config.finetune.drop_path == (0.2 if large else 0.1)
        assert config.optim.base_lr == (1.0e-3 if large else 1.5e-3)
        assert config.budget.epochs == 100 and config.finetune.mixup == 0.8  # the paper's recipe
