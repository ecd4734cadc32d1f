"""The run config's types and rules: strict values, unknown keys, the rules between settings, and
the one line each refusal reads as (nepa_scale/config/)."""

from __future__ import annotations

import copy

import pytest

from nepa_scale.config import ConfigError, RunConfig, config_from_dict, dump_yaml
from nepa_scale.config.files import set_dotted
from nepa_scale.launch.profiles import ClusterProfile

BASE = {"budget": {"global_batch": 32, "images": 320}}
SEGMENT = {
    "task": "segment",
    "model": {"overrides": {"dim": 64, "depth": 2, "num_heads": 4}},
    "data": {"kind": "digit_canvas"},
    "segment": {"num_classes": 11, "crop": 40, "scale": [40, 40]},
    **BASE,
}


def config(changes: dict, base: dict = BASE) -> RunConfig:
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        set_dotted(data, dotted, value)
    return config_from_dict(data)


def refusal(changes: dict, base: dict = BASE) -> str:
    with pytest.raises(ConfigError) as err:
        config(changes, base)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model.float8": "yes"}, "model.float8: expected true or false, got 'yes'"),
        ({"model.float8": 1}, "model.float8: expected true or false, got 1"),
        ({"optim.lr": "fast"}, "optim.lr: expected a number, got 'fast'"),
        ({"optim.lr": True}, "optim.lr: expected a number, got True"),
        ({"budget.images": "320"}, "budget.images: expected an integer, got '320'"),
        ({"budget.images": 320.5}, "budget.images: expected an integer, got 320.5"),
        ({"seed": False}, "seed: expected an integer, got False"),
        ({"deepspeed.zero_stage": True}, "deepspeed.zero_stage: expected an integer, got True"),
        ({"output_dir": 3}, "output_dir: expected a string, got 3"),
        ({"optim.betas": [0.9]}, "optim.betas: expected a list of 2 values, got [0.9]"),
        ({"budget.images": None, "budget.flops": float("nan")}, "budget.flops: expected a finite number"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(changes, message):
    assert refusal(changes).startswith(message)


def test_what_yaml_spells_as_a_number_still_reads_as_one():
    """YAML 1.1 reads 2e-3 (no dot) as a string and 1.28e6 as a float: both were accepted before."""
    loaded = config({"optim.lr": "2e-3", "budget.images": 1.28e6, "optim.min_lr": 0})
    assert loaded.optim.lr == 0.002 and loaded.budget.images == 1_280_000
    assert isinstance(loaded.optim.min_lr, float) and isinstance(loaded.budget.images, int)
    assert config({"model.grad_checkpointing": 1.0}).model.grad_checkpointing == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"optim.bogus": 1},
            "optim.bogus: unknown key (known: base_lr, betas, clip_grad, cooldown_fraction,",
        ),
        ({"bogus_key": 1}, "bogus_key: unknown key (known: branch, budget, checkpoint,"),
        (
            {"logging.probe_limit": 5},
            "logging.probe_limit: no longer a setting (use logging.probe_train_per_class",
        ),
    ],
)
def test_an_unknown_or_retired_key_is_named_with_what_is_known(changes, message):
    assert refusal(changes).startswith(message)


def test_a_retired_key_at_null_and_an_empty_section_read_as_before():
    assert config({"logging.probe_limit": None, "objective": None}).objective.shift is True


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data.hflip": 1.5}, "data.hflip: must be in [0, 1], got 1.5"),
        ({"optim.betas": [0.9, 1.0]}, "optim.betas[1]: must be in [0, 1), got 1.0"),
        ({"checkpoint.keep_steps": [10, 0]}, "checkpoint.keep_steps[1]: must be > 0, got 0"),
        (
            {"model.compile": "always"},
            "model.compile: unknown scope 'always' (choose from none, blocks, model)",
        ),
        ({"deepspeed.zero_stage": 4}, "deepspeed.zero_stage: must be 0, 1, 2 or 3, got 4"),
        ({"data.worker_start": "thread"}, "data.worker_start: must be fork, spawn or forkserver (or null)"),
        ({"finetune.layer_decay": 2}, "finetune.layer_decay: must be in (0, 1], got 2"),
    ],
)
def test_ranges_and_choices_are_named_in_the_refusal(changes, message):
    assert refusal(changes).startswith(message)


@pytest.mark.parametrize(
    "changes, message",
    [
        # sections' own rules
        (
            {"model.compile_mode": "max-autotune-no-cudagraphs"},
            "model.compile_mode: max-autotune-no-cudagraphs needs",
        ),
        ({"model.grad_checkpointing": 9}, "model.grad_checkpointing: 9 blocks, but the model has 4"),
        ({"model.overrides": {"dim": "wide"}}, "model.overrides:"),
        ({"data.kind": "imagefolder"}, "data.root: required for data.kind=imagefolder"),
        ({"data.crop_scale": [0.9, 0.5]}, "data.crop_scale: need 0 < min <= max <= 1"),
        ({"budget.epochs": 2}, "budget: set exactly one of budget.images, budget.epochs, budget.flops"),
        ({"deepspeed.offload_params": True}, "deepspeed.offload_params: needs deepspeed.zero_stage=3"),
        ({"branch.step": 5}, "branch: set both branch.parent and branch.step, or neither"),
        ({"segment.eval_stride": 600}, "segment.eval_stride: must be in 1..segment.crop (518), got 600"),
        ({"segment.ratio_range": [2.0, 1.0]}, "segment.ratio_range: need 0 < min <= max"),
        # rules across sections
        ({"data.kind": "digit_canvas"}, "data.kind: digit_canvas is not a dataset for task pretrain"),
        ({"optim.lr": 1e-3, "optim.min_lr": 0.5}, "optim.min_lr: 0.5 is above the peak lr 0.001 (optim.lr)"),
        ({"logging.probe_ema": True}, "logging.probe_ema: needs checkpoint.ema_decay"),
        (
            {"task": "finetune", "logging.probe_every": 5},
            "logging.probe_every: probes run during pretraining",
        ),
        (
            {"task": "finetune", "budget.global_batch": 33},
            "budget.global_batch: Mixup/CutMix need an even batch",
        ),
        (
            {"checkpoint.ema_decay": 0.9, "deepspeed.zero_stage": 3},
            "checkpoint.ema_decay: EMA needs full parameters",
        ),
        ({"branch.parent": "/trunk", "branch.step": 5}, "branch: a cooldown branch needs optim.schedule=wsd"),
    ],
)
def test_each_rule_between_settings_refuses_in_one_line(changes, message):
    assert refusal(changes).startswith(message)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"segment.crop": 42}, "segment.crop: must be a multiple of the patch size 4, got 42"),
        ({"segment.num_classes": 12}, "segment.num_classes: digit canvases have 11 classes"),
        ({"segment.feature_blocks": [2, 1, 2, 2]}, "segment.feature_blocks: four blocks in 1..2, in order"),
        (
            {"deepspeed.zero_stage": 3},
            "deepspeed.zero_stage: segmentation evaluates images of different sizes",
        ),
        ({"model.grad_checkpointing": "auto"}, "model.grad_checkpointing: auto sizes the backbone only"),
    ],
)
def test_segmentation_rules_hold_for_segmentation_runs(changes, message):
    assert refusal(changes, SEGMENT).startswith(message)


def test_a_pretraining_run_does_not_fit_its_unused_segment_section_to_the_model():
    assert config({"segment.crop": 42, "segment.feature_blocks": [2, 1, 2, 2]}).segment.crop == 42


def test_a_config_dumps_as_json_values_in_its_declared_order():
    loaded = config({"optim.lr": 1})
    data = loaded.to_dict()
    assert list(data) == list(RunConfig.model_fields) and data["optim"]["lr"] == 1.0
    assert data["data"]["crop_scale"] == [0.08, 1.0] and "crop_scale:\n  - 0.08\n" in dump_yaml(loaded)
    assert config_from_dict(data) == loaded


def test_cluster_profiles_use_the_same_types_and_rules():
    from nepa_scale.config import validated

    with pytest.raises(ConfigError, match=r"^profile x: tasks_per_node: one task per GPU, so it must equal"):
        validated(ClusterProfile, {"gpus_per_node": 8, "tasks_per_node": 1}, "profile x: ")
    with pytest.raises(ConfigError, match=r"^profile x: nodes: expected an integer, got '2'"):
        validated(ClusterProfile, {"nodes": "2"}, "profile x: ")
    with pytest.raises(ConfigError, match=r"^profile x: nodes: must be >= 1, got 0"):
        validated(ClusterProfile, {"nodes": 0}, "profile x: ")
