"""Run configuration: typed sections, YAML loading, ``key=value`` overrides, validation in one place.

Every error is one line that names the offending key (``ConfigError: optim.lr: must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nepa_scale.errors import ConfigError
from nepa_scale.flops import CONVENTIONS
from nepa_scale.models.arch import BACKENDS, NepaArch, checkpointed_blocks
from nepa_scale.models.zoo import get_arch, list_models

COMPILE_SCOPES = ("none", "blocks", "model")
# torch.compile modes that leave CUDA graphs out (ZeRO's hooks run between the blocks).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
SCHEDULES = ("cosine", "wsd", "constant", "poly")
COOLDOWN_SHAPES = ("linear", "1-sqrt")
TASKS = ("pretrain", "finetune", "segment")
SEGMENT_KINDS = ("ade20k", "digit_canvas")  # (image, label map) datasets, for task: segment
DATA_KINDS = ("digits", "imagefolder", "synthetic", *SEGMENT_KINDS)
WORKER_STARTS = ("fork", "spawn", "forkserver")
SEGMENT_EVAL_MODES = ("slide", "whole")  # sliding-window or whole-image inference


@dataclass
class ModelConfig:
    name: str = "nepa_tiny"
    attention: str = "auto"
    # Activation checkpointing: false | true (every block) | N (the first N blocks) | auto (the fewest
    # blocks for the memory model's peak to fit 90% of the device's memory; nepa_scale/memory.py).
    grad_checkpointing: bool | int | str = False
    compile: str = "none"  # none | blocks (torch.compile each block: the same kernels, compiled once) | model
    compile_mode: str = "default"  # default | max-autotune-no-cudagraphs (autotuned matmul kernels)
    # float8 linear layers in the blocks (torchao's dynamic scaling; pip install 'nepa-scale[float8]'):
    # FLOPs and MFU stay counted as bf16 (MFU is then bf16-equivalent). Needs a GPU with float8
    # tensor cores (H100, H200) to gain; it runs, slowly, anywhere.
    float8: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # any NepaArch field, e.g. {dim: 256}

    def arch(self) -> NepaArch:
        return get_arch(self.name, **self.overrides)

    @property
    def compiled(self) -> bool:
        """The blocks run compiled (either scope): what the memory model needs to know."""
        return self.compile != "none"


@dataclass
class DataConfig:
    # digits | imagefolder | synthetic | ade20k | digit_canvas (the last two: task segment)
    kind: str = "digits"
    # imagefolder: directory holding train/ and val/ (ImageNet layout); ade20k: ADEChallengeData2016
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    eval_crop_pct: float = 0.875  # evaluation: resize to size / crop_pct, centre crop
    num_workers: int = 0
    # How loader workers start: fork (Linux's default), spawn or forkserver (what CUDA processes and
    # torch.compile's workers need); None: the platform's default.
    worker_start: str | None = None
    synthetic_size: int = 4096
    # cpu: PIL in the loader workers | device: JPEGs decoded on the GPU (imagefolder pretraining)
    decode: str = "cpu"


@dataclass
class OptimConfig:
    base_lr: float = 3e-4  # lr = base_lr * global_batch / 256 unless lr is set
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05  # not on biases, norms, LayerScale (every parameter with ndim <= 1)
    warmup_fraction: float = 0.025
    # A warmup of fixed length (overrides warmup_fraction): what a WSD study needs, so that runs of
    # different lengths share one trunk.
    warmup_steps: int | None = None
    min_lr: float = 0.0
    clip_grad: float = 1.0
    # cosine: decay to min_lr over the whole run (the paper's) | wsd: warmup-stable-decay, constant
    # until the last cooldown_fraction of the run, then cooldown_shape down to min_lr | constant |
    # poly: linear decay (power 1) to min_lr after warmup (mmsegmentation's segmentation schedule)
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    cooldown_shape: str = "1-sqrt"  # linear | 1-sqrt (Hägele et al. 2024)

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 256


@dataclass
class BudgetConfig:
    global_batch: int = 4096
    micro_batch: int | None = None  # per process; default: global_batch / world_size
    images: int | None = None  # exactly one of images / epochs / flops sets the run length
    epochs: float | None = None
    flops: float | None = None
    flop_convention: str = "6N+attn"

    def total_steps(self, steps_per_epoch: int, flops_per_image: float) -> int:
        """Optimizer steps for this budget (the planner and the trainer use this one rule)."""
        if self.images is not None:
            return max(1, math.ceil(self.images / self.global_batch))
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * steps_per_epoch))
        return max(1, math.ceil(self.flops / (flops_per_image * self.global_batch)))


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    offload_params: bool = False
    # bf16: skip optimizer steps whose gradients are not finite. DeepSpeed's check tests every
    # gradient and makes the host wait for the GPU each step (docs/performance.md: what it costs), so
    # it is off: a non-finite loss stops the run instead. Turn it on for a run that keeps stopping.
    check_grad_overflow: bool = False
    # Communication (nepa_scale/comm.py: what they change). None keeps DeepSpeed's default: overlap
    # gradient reduction with backward for ZeRO-3 only; gradient buckets of 5e8 elements, so up to
    # L/14 a model's gradients go in one piece after its backward (H/14's in two).
    overlap_comm: bool | None = None
    reduce_bucket_size: int | None = None  # elements
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config


@dataclass
class ObjectiveConfig:
    stop_gradient: bool = True  # False only for the paper's collapse ablation
    shift: bool = True


@dataclass
class FinetuneConfig:
    """The paper's classification fine-tuning (used when ``task: finetune``)."""

    pretrained: str | None = None  # weights file (ours or official layout) or a run directory (its export/)
    pretrained_ema: bool = False  # from a run directory: take the EMA weights
    num_classes: int | None = None  # default: the number of classes of the training split
    layer_decay: float = 0.65  # B 0.65, L 0.75
    drop_path: float = 0.1  # B 0.1, L 0.2
    freeze_patch_embed: bool = True
    causal: bool = False  # the paper also reports causal fine-tuning
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    # Few-label transfer: fine-tune on this class-stratified share of the training split (the same
    # images for every run that asks for the same share; evaluation still uses the whole val split).
    label_fraction: float = 1.0


@dataclass
class SegmentConfig:
    """Semantic segmentation transfer (used when ``task: segment``): UPerNet on four blocks of a
    bidirectional backbone, mmsegmentation's ADE20K protocol (docs/segmentation.md)."""

    pretrained: str | None = None  # weights file (ours or official layout) or a run directory (its export/)
    pretrained_ema: bool = False
    num_classes: int = 150  # ADE20K; data.kind=digit_canvas has 11 (background and 10 digits)
    feature_blocks: list[int] | None = None  # 1-based; default per depth (B: 4 6 8 12, L: 8 12 16 24)
    decoder_channels: int = 512  # UPerNet's width (mmseg's default; BEiT's ViT-B config: 768)
    aux_channels: int = 256
    aux_weight: float = 0.4  # the auxiliary FCN head's loss weight
    layer_decay: float = 0.65
    drop_path: float = 0.1
    causal: bool = False
    # The training crop and sliding window (px): 37 x 14 for patch 14, the protocol's 512 rounded up.
    crop: int = 518
    # Images are resized to fit these (long, short) edges (training: times a random ratio): the
    # protocol's (2048, 512) scaled as its crop, 512 -> 518, so that evaluation windows hold no padding.
    scale: tuple[int, int] = (2072, 518)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True
    eval_mode: str = "slide"  # slide (windows of crop px, stride eval_stride) | whole (padded to the patch)
    eval_stride: int | None = None  # default: 2/3 of the crop (mmseg: 341 for 512)
    eval_limit: int | None = None  # evaluate during training on the first N val images (None: all)


@dataclass
class LoggingConfig:
    log_every: int = 10
    eval_every: int = 0  # held-out loss every N steps (0: only at the end)
    eval_batches: int | None = 4  # micro-batches per rank the held-out loss takes (None: the whole split)
    tensorboard: bool = False
    wandb_project: str | None = None
    progress: str = "auto"  # auto (interactive terminals only) | always | never
    device_peak_tflops: float | None = None  # for MFU; None: known GPUs only
    collapse_loss: float = -0.99  # flag collapse when loss < this ...
    collapse_spread: float = 0.02  # ... and the target spread < this
    # kNN + linear probe every N steps, at the end and at step 0 (0: off), on the same evaluation
    # line as the held-out loss; eval_every = probe_every evaluates both at every point.
    probe_every: int = 0
    probe_k: int = 20
    # The probe's images: a class-balanced subset of each split, drawn with probe_subset_seed (not
    # the run's seed, so every run of a study probes the same images; None: the whole split).
    probe_train_per_class: int | None = None
    probe_val_per_class: int | None = None
    probe_subset_seed: int = 0
    probe_causal: bool = True  # probe features with causal (as pretrained) or bidirectional attention
    probe_ema: bool = False  # probe the EMA weights (needs checkpoint.ema_decay)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps
    keep_last: int = 2
    keep_every: int = 0  # also keep every N-th step forever (0: off), for the analysis
    on_corrupt: str = "error"  # error | previous (logged fallback to the previous committed checkpoint)
    ema_decay: float | None = None  # keep an EMA copy of the weights for evaluation and export
    ema_warmup: bool = False  # timm's EMA warmup (decay grows to ema_decay): for short runs
    # Resuming with a different budget.* changes the lr schedule mid-run (a cosine decay restarts its
    # tail): refused unless asked for, e.g. to extend a finished run on purpose. Logged and recorded.
    allow_budget_change: bool = False
    # Also save at these steps and keep them for good: a WSD trunk's branch points (set by the planner).
    keep_steps: list[int] = field(default_factory=list)
    # Resume although metrics.jsonl no longer covers the steps before the checkpoint (deleted, cut):
    # refused unless asked for; the gap is then recorded in run.json.
    allow_lost_history: bool = False


@dataclass
class DistributedConfig:
    """How the ranks of a run talk to each other."""

    # How long a collective may wait before it fails (DeepSpeed's process groups and the preemption
    # group). When a rank dies, gloo's peers fail within seconds ("Connection reset by peer"), but an
    # NCCL collective waits this long; the survivors then record the run interrupted at its last
    # committed checkpoint and requeue it (slurm/README.md). Keep it above the longest wait of a
    # healthy run: a checkpoint write on a slow file system, a straggling data loader.
    timeout_s: float = 600.0


@dataclass
class BranchConfig:
    """A WSD cooldown branch: the run starts from ``parent``'s committed checkpoint at ``step`` (its
    cooldown start) and trains only its cooldown. Set by the sweep planner; bitwise the same run
    as a standalone one of its budget, so none of this enters the run id."""

    parent: str | None = None  # the trunk's run directory
    step: int | None = None


@dataclass
class RunConfig:
    task: str = "pretrain"  # pretrain | finetune | segment
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: str = "runs/default"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint cannot survive a change of: model shape, batch, data order,
        objective, and the optimizer's settings (restored from the checkpoint, so a change would be
        silently ignored). As JSON values (lists, not tuples), as a checkpoint records them."""
        arch = dataclasses.asdict(self.model.arch())
        o = self.optim
        fingerprint = {
            "task": self.task,
            "model": {k: v for k, v in arch.items() if k != "drop_path"},
            "budget.global_batch": self.budget.global_batch,
            "data.kind": self.data.kind,
            "seed": self.seed,
            "objective": dataclasses.asdict(self.objective),
            "optim": {
                "peak_lr": o.peak_lr(self.budget.global_batch),
                "warmup_fraction": o.warmup_fraction,
                "min_lr": o.min_lr,
                "betas": o.betas,
                "eps": o.eps,
                "weight_decay": o.weight_decay,
            },
        }
        # Settings added later enter only when set, so that digests recorded before them still match.
        if o.warmup_steps is not None:
            fingerprint["optim"]["warmup_steps"] = o.warmup_steps
        if o.schedule != "cosine":
            fingerprint["optim"]["schedule"] = o.schedule
        if o.schedule == "wsd":
            fingerprint["optim"]["cooldown"] = [o.cooldown_fraction, o.cooldown_shape]
        if self.task == "finetune":
            fingerprint["finetune.layer_decay"] = self.finetune.layer_decay
            if self.finetune.label_fraction != 1.0:  # a different training set, a different data order
                fingerprint["finetune.label_fraction"] = self.finetune.label_fraction
        if self.task == "segment":
            sg = self.segment
            fingerprint["segment"] = {
                "num_classes": sg.num_classes,
                "feature_blocks": sg.feature_blocks,
                "channels": [sg.decoder_channels, sg.aux_channels],
                "layer_decay": sg.layer_decay,
                "crop": sg.crop,
            }
        return json.loads(json.dumps(fingerprint))

    def resume_digest(self) -> str:
        """A short digest of ``resume_fingerprint()`` (recorded in run.json and every checkpoint)."""
        blob = json.dumps(self.resume_fingerprint(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- parsing


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Coerce a YAML value to ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf, .nan: no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    raise ConfigError(f"{key}: unsupported type {hint}")


# Keys this project no longer reads: a run record that has them still reads back (they are dropped),
# a config file holding one at null (an old run's config.yaml) loads; one that sets a value gets the
# replacement named.
RETIRED_KEYS = {
    "logging.probe_limit": "use logging.probe_train_per_class and logging.probe_val_per_class",
}


def drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the retired keys (a recorded config written by older code)."""
    data = json.loads(json.dumps(data))
    for dotted in RETIRED_KEYS:
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    return data


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """A typed dataclass from a YAML mapping; unknown keys and wrong types raise a ConfigError naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if not (v is None and f"{prefix}.{k}".lstrip(".") in RETIRED_KEYS)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            if where in RETIRED_KEYS:
                raise ConfigError(f"{where}: no longer a setting ({RETIRED_KEYS[where]})")
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["a"]["b"]["c"] = value`` for ``dotted="a.b.c"``, creating sections on the way."""
    parts = dotted.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str, what: str = "override") -> tuple[str, Any]:
    """``"a.b.c=value"`` -> ``("a.b.c", value)`` with the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"{what} '{item}': expected key=value")
    dotted, raw = item.split("=", 1)
    return dotted.strip(), _parse_scalar(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return data


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a one-line ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def config_from_dict(data: dict[str, Any], check_paths: bool = True) -> RunConfig:
    """A validated RunConfig. ``check_paths=False`` checks values only: for reading a run back
    (collect, report, export, probe), where the data may since have moved or been unmounted."""
    config = build_dataclass(RunConfig, data)
    validate(config)
    if check_paths:
        check_input_paths(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(c: RunConfig) -> None:
    """Value checks that need neither hardware nor files (``check_world`` checks the world size,
    ``check_input_paths`` the files a run reads)."""
    _require(
        c.model.name in list_models(),
        f"model.name: unknown model '{c.model.name}' (choose from {', '.join(list_models())})",
    )
    _require(
        c.model.attention in BACKENDS,
        f"model.attention: unknown backend '{c.model.attention}' (choose from {', '.join(BACKENDS)})",
    )
    _require(
        not isinstance(c.model.grad_checkpointing, str) or c.model.grad_checkpointing == "auto",
        f"model.grad_checkpointing: true, false, a number of blocks or auto, got '{c.model.grad_checkpointing}'",
    )
    _require(
        c.model.compile in COMPILE_SCOPES,
        f"model.compile: unknown scope '{c.model.compile}' (choose from {', '.join(COMPILE_SCOPES)})",
    )
    _require(
        c.model.compile_mode in COMPILE_MODES,
        f"model.compile_mode: unknown mode '{c.model.compile_mode}' (choose from {', '.join(COMPILE_MODES)})",
    )
    _require(
        c.model.compile_mode == "default" or c.model.compiled,
        f"model.compile_mode: {c.model.compile_mode} needs model.compile blocks or model (it is none)",
    )
    if c.model.float8:
        import importlib.util

        _require(
            importlib.util.find_spec("torchao") is not None,
            "model.float8: needs torchao (pip install 'nepa-scale[float8]')",
        )
    try:
        arch = c.model.arch()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"model.overrides: {exc}") from None
    if not isinstance(c.model.grad_checkpointing, str):
        try:
            checkpointed_blocks(c.model.grad_checkpointing, arch.depth)
        except ValueError as exc:
            raise ConfigError(f"model.{exc}") from None
    _require(
        c.data.kind in DATA_KINDS,
        f"data.kind: unknown dataset '{c.data.kind}' (choose {', '.join(DATA_KINDS)})",
    )
    if c.data.kind in ("imagefolder", "ade20k"):
        _require(c.data.root is not None, f"data.root: required for data.kind={c.data.kind}")
    _require(
        (c.task == "segment") == (c.data.kind in SEGMENT_KINDS),
        f"data.kind: {c.data.kind} is not a dataset for task {c.task} (segmentation: "
        f"{', '.join(SEGMENT_KINDS)})",
    )
    _require(c.data.decode in ("cpu", "device"), f"data.decode: must be cpu or device, got '{c.data.decode}'")
    if c.data.decode == "device":
        _require(
            c.data.kind == "imagefolder",
            f"data.decode: device needs data.kind=imagefolder, got '{c.data.kind}'",
        )
        _require(
            c.task == "pretrain", "data.decode: device is for pretraining (fine-tuning augments with PIL)"
        )
        _require(
            c.data.interpolation in ("bicubic", "bilinear"),
            f"data.interpolation: data.decode=device resizes bicubic or bilinear, got '{c.data.interpolation}'",
        )
    lo, hi = c.data.crop_scale
    _require(0 < lo <= hi <= 1, f"data.crop_scale: need 0 < min <= max <= 1, got {c.data.crop_scale}")
    _require(0 <= c.data.hflip <= 1, f"data.hflip: must be in [0, 1], got {c.data.hflip}")
    _require(c.data.num_workers >= 0, f"data.num_workers: must be >= 0, got {c.data.num_workers}")
    _require(
        c.data.worker_start in (None, *WORKER_STARTS),
        f"data.worker_start: must be one of {', '.join(WORKER_STARTS)} (or null), got '{c.data.worker_start}'",
    )
    _require(c.optim.base_lr > 0, f"optim.base_lr: must be > 0, got {c.optim.base_lr}")
    _require(c.optim.lr is None or c.optim.lr > 0, f"optim.lr: must be > 0, got {c.optim.lr}")
    _require(
        all(0 <= b < 1 for b in c.optim.betas), f"optim.betas: each must be in [0, 1), got {c.optim.betas}"
    )
    _require(c.optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {c.optim.weight_decay}")
    _require(c.optim.min_lr >= 0, f"optim.min_lr: must be >= 0, got {c.optim.min_lr}")
    if c.budget.global_batch > 0:
        peak = c.optim.peak_lr(c.budget.global_batch)
        source = "optim.lr" if c.optim.lr is not None else "optim.base_lr x budget.global_batch / 256"
        _require(
            c.optim.min_lr <= peak,
            f"optim.min_lr: {c.optim.min_lr:g} is above the peak lr {peak:g} ({source}): the schedule would "
            "raise the lr instead of decaying it",
        )
    _require(
        0 <= c.optim.warmup_fraction < 1,
        f"optim.warmup_fraction: must be in [0, 1), got {c.optim.warmup_fraction}",
    )
    _require(
        c.optim.warmup_steps is None or c.optim.warmup_steps >= 0,
        f"optim.warmup_steps: must be >= 0, got {c.optim.warmup_steps}",
    )
    _require(
        c.optim.schedule in SCHEDULES,
        f"optim.schedule: unknown schedule '{c.optim.schedule}' (choose from {', '.join(SCHEDULES)})",
    )
    _require(
        0 < c.optim.cooldown_fraction <= 1,
        f"optim.cooldown_fraction: must be in (0, 1], got {c.optim.cooldown_fraction}",
    )
    _require(
        c.optim.cooldown_shape in COOLDOWN_SHAPES,
        f"optim.cooldown_shape: must be one of {', '.join(COOLDOWN_SHAPES)}, got '{c.optim.cooldown_shape}'",
    )
    _require(c.optim.clip_grad >= 0, f"optim.clip_grad: must be >= 0 (0 disables), got {c.optim.clip_grad}")
    b = c.budget
    _require(b.global_batch > 0, f"budget.global_batch: must be > 0, got {b.global_batch}")
    _require(
        b.micro_batch is None or b.micro_batch > 0, f"budget.micro_batch: must be > 0, got {b.micro_batch}"
    )
    lengths = [k for k in ("images", "epochs", "flops") if getattr(b, k) is not None]
    _require(
        len(lengths) == 1,
        f"budget: set exactly one of budget.images, budget.epochs, budget.flops (got {lengths or 'none'})",
    )
    _require(getattr(b, lengths[0]) > 0, f"budget.{lengths[0]}: must be > 0, got {getattr(b, lengths[0])}")
    _require(
        b.flop_convention in CONVENTIONS,
        f"budget.flop_convention: unknown '{b.flop_convention}' (choose from {', '.join(CONVENTIONS)})",
    )
    d = c.deepspeed
    _require(d.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {d.zero_stage}")
    _require(
        d.precision in ("auto", "fp32", "bf16"),
        f"deepspeed.precision: must be auto, fp32 or bf16, got '{d.precision}'",
    )
    _require(
        not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params: needs deepspeed.zero_stage=3"
    )
    _require(
        not d.offload_optimizer or d.zero_stage >= 1,
        "deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1",
    )
    _require(
        d.reduce_bucket_size is None or d.reduce_bucket_size > 0,
        f"deepspeed.reduce_bucket_size: must be > 0 elements, got {d.reduce_bucket_size}",
    )
    _require(c.task in TASKS, f"task: must be one of {', '.join(TASKS)}, got '{c.task}'")
    if c.task == "segment":
        _validate_segment(c, arch.depth)
    ft = c.finetune
    if c.task == "finetune":
        _require(0 < ft.layer_decay <= 1, f"finetune.layer_decay: must be in (0, 1], got {ft.layer_decay}")
        _require(0 <= ft.drop_path < 1, f"finetune.drop_path: must be in [0, 1), got {ft.drop_path}")
        _require(0 <= ft.re_prob <= 1, f"finetune.re_prob: must be in [0, 1], got {ft.re_prob}")
        _require(ft.mixup >= 0 and ft.cutmix >= 0, "finetune.mixup/cutmix: must be >= 0")
        _require(0 <= ft.smoothing < 1, f"finetune.smoothing: must be in [0, 1), got {ft.smoothing}")
        _require(
            0 < ft.label_fraction <= 1, f"finetune.label_fraction: must be in (0, 1], got {ft.label_fraction}"
        )
        _require(
            ft.label_fraction == 1 or c.data.kind != "synthetic",
            "finetune.label_fraction: synthetic images have no labels to subsample (use digits or imagefolder)",
        )
        _require(
            ft.num_classes is None or ft.num_classes > 1,
            f"finetune.num_classes: must be > 1, got {ft.num_classes}",
        )
        _require(
            (ft.mixup == 0 and ft.cutmix == 0) or c.budget.global_batch % 2 == 0,
            "budget.global_batch: Mixup/CutMix need an even batch",
        )
    lg = c.logging
    _require(
        not lg.probe_every or c.task == "pretrain",
        "logging.probe_every: probes run during pretraining (task: pretrain)",
    )
    _require(lg.probe_every >= 0, f"logging.probe_every: must be >= 0, got {lg.probe_every}")
    _require(lg.probe_k > 0, f"logging.probe_k: must be > 0, got {lg.probe_k}")
    for key in ("probe_train_per_class", "probe_val_per_class"):
        value = getattr(lg, key)
        _require(
            value is None or value > 0, f"logging.{key}: must be > 0 (or null: the whole split), got {value}"
        )
    _require(
        not lg.probe_ema or c.checkpoint.ema_decay is not None,
        "logging.probe_ema: needs checkpoint.ema_decay",
    )
    _require(
        0 < c.data.eval_crop_pct <= 1, f"data.eval_crop_pct: must be in (0, 1], got {c.data.eval_crop_pct}"
    )
    _require(lg.log_every > 0, f"logging.log_every: must be > 0, got {lg.log_every}")
    _require(
        lg.eval_batches is None or lg.eval_batches >= 1,
        f"logging.eval_batches: must be >= 1 (or null: the whole val split), got {lg.eval_batches}",
    )
    _require(lg.eval_every >= 0, f"logging.eval_every: must be >= 0, got {lg.eval_every}")
    _require(
        lg.progress in ("auto", "always", "never"),
        f"logging.progress: must be auto, always or never, got {lg.progress!r}",
    )
    _require(
        c.distributed.timeout_s > 0,
        f"distributed.timeout_s: must be > 0 seconds, got {c.distributed.timeout_s}",
    )
    ck = c.checkpoint
    _require(ck.every > 0, f"checkpoint.every: must be > 0, got {ck.every}")
    _require(ck.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {ck.keep_last}")
    _require(ck.keep_every >= 0, f"checkpoint.keep_every: must be >= 0, got {ck.keep_every}")
    _require(
        all(step > 0 for step in ck.keep_steps),
        f"checkpoint.keep_steps: steps must be > 0, got {ck.keep_steps}",
    )
    br = c.branch
    _require(
        (br.parent is None) == (br.step is None),
        "branch: set both branch.parent and branch.step, or neither",
    )
    if br.parent is not None:
        _require(br.step > 0, f"branch.step: must be > 0, got {br.step}")
        _require(
            c.optim.schedule == "wsd",
            f"branch: a cooldown branch needs optim.schedule=wsd, got '{c.optim.schedule}'",
        )
        _require(c.task == "pretrain", "branch: cooldown branches are for pretraining (task: pretrain)")
    _require(
        ck.on_corrupt in ("error", "previous"),
        f"checkpoint.on_corrupt: must be error or previous, got '{ck.on_corrupt}'",
    )
    _require(
        ck.ema_decay is None or 0 < ck.ema_decay < 1,
        f"checkpoint.ema_decay: must be in (0, 1), got {ck.ema_decay}",
    )
    _require(
        ck.ema_decay is None or d.zero_stage < 3,
        "checkpoint.ema_decay: EMA needs full parameters on every rank (deepspeed.zero_stage <= 2)",
    )


def _validate_segment(c: RunConfig, depth: int) -> None:
    sg = c.segment
    _require(sg.num_classes > 1, f"segment.num_classes: must be > 1, got {sg.num_classes}")
    _require(
        c.data.kind != "digit_canvas" or sg.num_classes == 11,
        f"segment.num_classes: digit canvases have 11 classes (background and ten digits), got {sg.num_classes}",
    )
    _require(
        c.model.grad_checkpointing != "auto",
        "model.grad_checkpointing: auto sizes the backbone only, not the pyramid and heads: give a "
        "number of blocks (or true) for task: segment",
    )
    _require(0 < sg.layer_decay <= 1, f"segment.layer_decay: must be in (0, 1], got {sg.layer_decay}")
    _require(0 <= sg.drop_path < 1, f"segment.drop_path: must be in [0, 1), got {sg.drop_path}")
    _require(sg.aux_weight >= 0, f"segment.aux_weight: must be >= 0, got {sg.aux_weight}")
    blocks = sg.feature_blocks
    _require(
        blocks is None
        or (len(blocks) == 4 and all(1 <= b <= depth for b in blocks) and blocks == sorted(blocks)),
        f"segment.feature_blocks: four blocks in 1..{depth}, in order (a block may repeat), got {blocks}",
    )
    patch = c.model.arch().patch_size
    _require(
        sg.crop > 0 and sg.crop % patch == 0,
        f"segment.crop: must be a multiple of the patch size {patch}, got {sg.crop}",
    )
    _require(min(sg.scale) > 0, f"segment.scale: edges must be > 0, got {sg.scale}")
    lo, hi = sg.ratio_range
    _require(0 < lo <= hi, f"segment.ratio_range: need 0 < min <= max, got {sg.ratio_range}")
    _require(0 < sg.cat_max_ratio <= 1, f"segment.cat_max_ratio: must be in (0, 1], got {sg.cat_max_ratio}")
    _require(0 <= sg.hflip <= 1, f"segment.hflip: must be in [0, 1], got {sg.hflip}")
    _require(
        sg.eval_mode in ("slide", "whole"), f"segment.eval_mode: must be slide or whole, got '{sg.eval_mode}'"
    )
    _require(
        sg.eval_stride is None or 0 < sg.eval_stride <= sg.crop,
        f"segment.eval_stride: must be in 1..segment.crop ({sg.crop}), got {sg.eval_stride}",
    )
    _require(
        sg.eval_limit is None or sg.eval_limit > 0, f"segment.eval_limit: must be > 0, got {sg.eval_limit}"
    )
    _require(
        c.deepspeed.zero_stage <= 2,
        "deepspeed.zero_stage: segmentation evaluates images of different sizes rank by rank, which "
        "ZeRO-3's collective forward cannot do: use 0-2",
    )
    _require(c.checkpoint.ema_decay is None, "checkpoint.ema_decay: not supported for task: segment")


def check_input_paths(c: RunConfig) -> None:
    """The files a run reads exist: checked when a run starts or is launched, never when read back."""
    if c.data.kind == "imagefolder":
        root = Path(c.data.root) / c.data.train_split
        _require(root.is_dir(), f"data.root: directory not found: {root}")
    pretrained = c.finetune.pretrained
    _require(
        c.task != "finetune" or pretrained is None or Path(pretrained).exists(),
        f"finetune.pretrained: not found: {pretrained}",
    )
    _require(
        c.task != "segment" or c.segment.pretrained is None or Path(c.segment.pretrained).exists(),
        f"segment.pretrained: not found: {c.segment.pretrained}",
    )
    if c.data.kind == "ade20k":
        for folder in ("images/training", "annotations/training"):
            _require(
                (Path(c.data.root) / folder).is_dir(),
                f"data.root: directory not found: {Path(c.data.root) / folder}",
            )


def check_world(c: RunConfig, world_size: int) -> int:
    """The micro-batch per process for this world size; a ConfigError if the batch does not divide."""
    b = c.budget
    micro = b.micro_batch if b.micro_batch is not None else b.global_batch // world_size
    if micro <= 0 or b.global_batch % (world_size * micro):
        raise ConfigError(
            f"budget.global_batch: {b.global_batch} is not divisible by world size {world_size} x micro_batch {micro}"
        )
    return micro


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
