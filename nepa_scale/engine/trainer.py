"""One NEPA pretraining run through DeepSpeed: build, resume, train, checkpoint, stop.

The loop is deliberately plain: for each global step, ``accumulation_steps`` micro-batches of
forward / loss / ``engine.backward`` / ``engine.step`` (DeepSpeed steps the optimizer and the lr
schedule at the accumulation boundary). Everything a resumed run needs to be indistinguishable
from an uninterrupted one is restored: weights, optimizer, lr schedule, data position (a function
of the step), per-rank RNG states, EMA.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from nepa_scale.config import RunConfig, check_world, dump_yaml
from nepa_scale.data import ResumableBatchSampler, build_dataset, collate, to_model_input
from nepa_scale.data.device_decode import decode_on_device
from nepa_scale.data.resize import resized_copy_settings
from nepa_scale.engine import checkpoint as ckpt
from nepa_scale.engine.distributed import (
    World,
    control_group,
    deepspeed_config,
    init_world,
    resolve_precision,
)
from nepa_scale.engine.metrics import (
    NO_TIMER,
    IntervalMeter,
    MetricsWriter,
    PhaseTimer,
    device_peak_tflops,
    max_memory_gb,
    progress_bar,
)
from nepa_scale.engine.preemption import PreemptionFlag
from nepa_scale.engine.tasks import make_task
from nepa_scale.flops import train_flops_per_image
from nepa_scale.memory import blocks_to_checkpoint, device_memory_gb
from nepa_scale.models import NEPA, resolve_backend
from nepa_scale.models.arch import checkpointed_blocks
from nepa_scale.models.zoo import count_params
from nepa_scale.rundir import REQUEUE_EXIT_CODE, RunDir

log = logging.getLogger("nepa_scale.train")
NO_STEP = 2**62


class NonFiniteLoss(RuntimeError):
    pass


class ResumeRefused(RuntimeError):
    pass


@dataclass
class TrainResult:
    status: str  # completed | preempted
    step: int
    total_steps: int
    exit_code: int


# ----------------------------------------------------------------------------- pieces


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warmup from 0, then cosine to ``min_ratio`` (Hugging Face's convention, as the official code)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Ema:
    """An fp32 exponential moving average of the weights (evaluation and export, never a teacher)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)


def apply_compile(model: NEPA, scope: str) -> None:
    """torch.compile in place, before DeepSpeed wraps the model (state-dict keys are unchanged).

    ``blocks`` compiles each transformer block: identical blocks share one compiled graph, so it
    compiles in seconds for any depth, and ZeRO's per-module hooks stay outside the graphs."""
    if scope == "blocks":
        for block in model.blocks:
            block.compile()
    elif scope == "model":
        model.compile()


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    import deepspeed
    import timm

    import nepa_scale

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "timm": timm.__version__,
        "nepa_scale": nepa_scale.__version__,
        "cuda": torch.version.cuda or "",
    }


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    lines = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += [f"{key}.{line}" for line in fingerprint_diff(a, b)]
        elif a != b:
            lines.append(f"{key}: checkpoint {a!r} -> config {b!r}")
    return lines


def setup_logging(world: World) -> None:
    level = logging.INFO if world.is_main else logging.WARNING
    fmt = f"%(asctime)s [rank {world.rank}] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- the run


class Trainer:
    def __init__(self, config: RunConfig, preempt: PreemptionFlag | None = None):
        """``preempt``: a flag installed by the caller before start-up (the launcher does, so that a
        signal during start-up is not lost); by default the loop installs its own."""
        self.config = config
        self.preempt = preempt
        self.world = init_world()
        self.control_group = control_group(self.world)
        setup_logging(self.world)
        self.micro_batch = check_world(config, self.world.world_size)
        self.run = RunDir(config.output_dir)
        self.precision = resolve_precision(config, self.world.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.task = make_task(self)
        self.arch = self.task.arch(config.model.arch())
        self.current_step = 0
        self.meter = IntervalMeter()  # restored on resume: an interval cut by a preemption logs as if whole
        self.flops_per_image = train_flops_per_image(self.arch, config.budget.flop_convention)
        self.checkpointed_blocks = self._checkpointed_blocks()

    def _checkpointed_blocks(self) -> int:
        """``model.grad_checkpointing`` as a number of blocks; ``auto`` asks the memory model."""
        setting = self.config.model.grad_checkpointing
        if setting != "auto":
            return checkpointed_blocks(setting, self.arch.depth)
        memory_gb = device_memory_gb(self.world.device)
        blocks, estimate = blocks_to_checkpoint(
            self.arch,
            count_params(self.arch)["total"],
            micro_batch=self.micro_batch,
            precision=self.precision,
            zero_stage=self.config.deepspeed.zero_stage,
            world_size=self.world.world_size,
            compiled=self.config.model.compiled,
            memory_gb=memory_gb,
        )
        log.info(
            "model.grad_checkpointing=auto: %d of %d blocks (predicted peak %.1f GiB of %.1f GiB)",
            blocks,
            self.arch.depth,
            estimate.peak_gb,
            memory_gb,
        )
        return blocks

    # -- data
    def prepare_data(self) -> int:
        """The datasets and their resumable samplers; returns the run's total optimizer steps."""
        c = self.config
        self.train_set = self.task.train_dataset()
        self.val_set = build_dataset(c.data, "val", self.arch.image_size, train=False)
        self.sampler = ResumableBatchSampler(
            len(self.train_set),
            c.budget.global_batch,
            self.micro_batch,
            self.world.rank,
            self.world.world_size,
            c.seed,
        )
        eval_global = self.micro_batch * self.world.world_size
        self.val_sampler = (
            ResumableBatchSampler(
                len(self.val_set),
                eval_global,
                self.micro_batch,
                self.world.rank,
                self.world.world_size,
                shuffle=False,
            )
            if len(self.val_set) >= eval_global
            else None
        )
        return c.budget.total_steps(self.sampler.steps_per_epoch, self.flops_per_image)

    def _loader(self, sampler: ResumableBatchSampler) -> DataLoader:
        # A private generator: creating an iterator must not consume the global RNG (exact resume).
        return DataLoader(
            self.train_set if sampler is self.sampler else self.val_set,
            batch_sampler=sampler,
            num_workers=self.config.data.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.config.seed),
            pin_memory=self.world.device.type == "cuda",
        )

    # -- resume planning
    def _plan_resume(self) -> ckpt.Committed | None:
        root = self.run.checkpoints
        if self.world.is_main:
            ckpt.remove_uncommitted(root)
        barrier()
        committed = ckpt.committed_checkpoints(root)
        while committed:
            candidate = committed[-1]
            try:
                ckpt.verify(candidate)
            except ckpt.CheckpointError as exc:
                if self.config.checkpoint.on_corrupt != "previous" or len(committed) == 1:
                    raise
                log.error(
                    "%s; falling back to the previous committed checkpoint (checkpoint.on_corrupt=previous)",
                    exc,
                )
                committed.pop()
                continue
            diff = fingerprint_diff(candidate.meta.get("fingerprint", {}), self.config.resume_fingerprint())
            if diff:
                raise ResumeRefused(
                    f"config changed in a way that breaks resume from {candidate.path}: " + "; ".join(diff)
                )
            return candidate
        return None

    def _universal(self, source: ckpt.Committed) -> Path:
        """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0), for a new world size."""
        target = source.path.with_name(source.tag + ckpt.UNIVERSAL_SUFFIX)
        if self.world.is_main and not (target / ckpt.MARKER).exists():
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            log.info(
                "world size %d -> %d: converting %s to a universal checkpoint",
                source.meta["world_size"],
                self.world.world_size,
                source.path,
            )
            args = argparse.Namespace(  # ds_to_universal's command-line arguments
                input_folder=str(source.path),
                output_folder=str(target),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=True,
            )
            ds_to_universal(args)
            ckpt.commit(target, {"source": source.tag})
        barrier()
        return target

    # -- main
    def fit(self) -> TrainResult:
        engine, ema, start_step, total_steps = self.build()
        return self._loop(engine, ema, start_step, total_steps)

    def optimizer(self, model: torch.nn.Module, total_steps: int):
        """AdamW over the task's parameter groups and its lr schedule (warmup, then cosine)."""
        c = self.config
        peak_lr = c.optim.peak_lr(c.budget.global_batch)
        optimizer = torch.optim.AdamW(
            self.task.optimizer_groups(model, peak_lr),
            lr=peak_lr,
            betas=c.optim.betas,
            eps=c.optim.eps,
            fused=self.world.device.type == "cuda",  # one kernel for the whole update on GPUs
        )
        warmup_steps = round(c.optim.warmup_fraction * total_steps)
        schedule = lr_lambda(total_steps, warmup_steps, c.optim.min_lr / peak_lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def build_model(self) -> NEPA:
        """The task's model with its attention backend and compile scope (on the CPU; DeepSpeed moves it).

        Identical initial weights and RNG streams on every rank: torch (init, RoPE rescale, drop-path),
        numpy and python (Mixup/CutMix draw from them); all three are checkpointed per rank."""
        c = self.config
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        random.seed(c.seed)
        model = self.task.build_model()
        model.set_attention(backend=resolve_backend(c.model.attention, self.world.device, self.dtype))
        apply_compile(model, c.model.compile)
        return model

    def build(self, resume: bool = True):
        """Model, optimizer and DeepSpeed engine, resumed from the newest committed checkpoint unless
        ``resume`` is False (the benchmark); returns (engine, ema, start_step, total_steps)."""
        import deepspeed

        c, world, run = self.config, self.world, self.run
        total_steps = self.prepare_data()
        steps_per_epoch = self.sampler.steps_per_epoch

        model = self.build_model()
        backend = model.blocks[0].attn.backend
        ema = Ema(model, c.checkpoint.ema_decay) if c.checkpoint.ema_decay else None

        resume_from = self._plan_resume() if resume else None
        universal = (
            resume_from is not None
            and c.deepspeed.zero_stage > 0
            and resume_from.meta.get("world_size") != world.world_size
        )
        load_dir = self._universal(resume_from) if universal else None

        optimizer, scheduler = self.optimizer(model, total_steps)
        ds_config = deepspeed_config(c, world, self.micro_batch, load_universal=universal)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )

        start_step, restarts = 0, run.read_run().get("restarts", [])
        if resume_from is not None:
            start_step = self._load(engine, resume_from, load_dir, ema)
        elif world.is_main and run.checkpoints.is_dir() and any(run.checkpoints.iterdir()):
            log.warning("no committed checkpoint in %s: starting from step 0", run.checkpoints)

        if world.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            run.config_yaml.write_text(dump_yaml(c))
            dropped = run.truncate_metrics(start_step, len(restarts))
            if resume_from is not None:
                restarts.append(
                    {
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "unix_time": time.time(),
                        "from_step": start_step,
                        "world_size": world.world_size,
                        "discarded_metric_lines": dropped,
                    }
                )
            run.update_run(
                status="running",
                config=c.to_dict(),
                config_hash=c.config_hash(),
                versions=package_versions(),
                git_revision=git_revision(),
                code=str(Path(__file__).resolve().parents[1]),  # the package this run imported
                world_size=world.world_size,
                precision=self.precision,
                attention_backend=backend,
                checkpointed_blocks=self.checkpointed_blocks,
                data_resized=resized_copy_settings(c.data.root, c.data.train_split)
                if c.data.kind == "imagefolder"
                else None,
                total_steps=total_steps,
                steps_per_epoch=steps_per_epoch,
                flop_convention=c.budget.flop_convention,
                flops_per_image=self.flops_per_image,
                params=sum(p.numel() for p in model.parameters()),
                restarts=restarts,
                started=run.read_run().get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                skipped_files=run.read_run().get("skipped_files", []) if resume_from else [],
            )
        barrier()
        log.info(
            "run %s: %s (%s), %d steps of %d images (%d x %d micro-batches x %d ranks), %s, attention=%s, compile=%s, zero=%d, from step %d",
            run.root,
            c.model.name,
            f"{sum(p.numel() for p in model.parameters()):,} params",
            total_steps,
            c.budget.global_batch,
            self.micro_batch,
            self.sampler.accumulation_steps,
            world.world_size,
            self.precision,
            backend,
            c.model.compile,
            c.deepspeed.zero_stage,
            start_step,
        )
        return engine, ema, start_step, total_steps

    def _load(self, engine, source: ckpt.Committed, universal_dir: Path | None, ema: Ema | None) -> int:
        load_dir, tag = (
            (universal_dir.parent, universal_dir.name) if universal_dir else (source.path.parent, source.tag)
        )
        try:
            path, client = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except Exception as exc:
            raise ckpt.CheckpointError(
                f"cannot load committed checkpoint {source.path}: {type(exc).__name__}: {exc}"
            ) from exc
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed found nothing to load in {source.path}")
        step = int(source.meta["step"])
        if universal_dir is not None:
            # DeepSpeed restores the lr schedule only from its own client state: set it from the step.
            engine.lr_scheduler.last_epoch = step - 1
            engine.lr_scheduler.step()
        rng = ckpt.rng_file(source.path, self.world.rank)
        if rng.is_file():
            rank_state = ckpt.load_rng(source.path, self.world.rank)
            ckpt.set_rng_state(rank_state)
            self.meter.restore(rank_state.get("interval", {}), self.world.device)
        else:
            log.warning(
                "no RNG state for rank %d in %s (world size changed): fresh RNG streams",
                self.world.rank,
                source.path,
            )
            torch.manual_seed(self.config.seed * 1_000_003 + step)
        if ema is not None:
            ema_file = source.path / "ema.pt"
            if not ema_file.is_file():
                raise ckpt.CheckpointError(f"checkpoint.ema_decay is set but {ema_file} is missing")
            ema.load_state_dict(torch.load(ema_file, map_location="cpu", weights_only=True))
        log.info(
            "resumed from %s (step %d, images seen %d)",
            source.path,
            step,
            client.get("images_seen", -1) if client else -1,
        )
        return step

    def _save(self, engine, ema: Ema | None, step: int, reason: str) -> Path:
        c, world = self.config, self.world
        tag = ckpt.tag_for(step)
        path = self.run.checkpoints / tag
        client = {
            "step": step,
            "images_seen": step * c.budget.global_batch,
            "config_hash": c.config_hash(),
            "universal_checkpoint_info": {},
        }
        engine.save_checkpoint(str(self.run.checkpoints), tag=tag, client_state=client, save_latest=False)
        ckpt.save_rng(path, world.rank, {"interval": self.meter.partial()})
        if ema is not None and world.is_main:
            torch.save(ema.state_dict(), path / "ema.pt")
        barrier()
        if world.is_main:
            ckpt.commit(
                path,
                {
                    "step": step,
                    "images_seen": step * c.budget.global_batch,
                    "world_size": world.world_size,
                    "zero_stage": c.deepspeed.zero_stage,
                    "config_hash": c.config_hash(),
                    "fingerprint": c.resume_fingerprint(),
                    "reason": reason,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
            ckpt.retention(self.run.checkpoints, c.checkpoint.keep_last, c.checkpoint.keep_every)
        barrier()
        return path

    @torch.no_grad()
    def eval_batches(self, engine, score, limit: int | None = -1) -> float | None:
        """Mean of ``score(output, batch)`` over val micro-batches, weighted by batch size, across ranks.

        ``limit=-1`` takes ``logging.eval_batches`` micro-batches per rank; None takes the whole split."""
        if self.val_sampler is None:
            return None
        limit = self.config.logging.eval_batches if limit == -1 else limit
        engine.eval()
        total = torch.zeros(2, device=self.world.device)
        self.val_sampler.set_position(0, 0)
        for i, batch in enumerate(self._loader(self.val_sampler)):
            if (limit is not None and i >= limit) or len(batch.images) == 0:
                break
            value = score(engine(to_model_input(batch.images, self.world.device, self.dtype)), batch)
            n = float(len(batch.images))
            total += torch.stack(
                [value.float().to(self.world.device) * n, torch.tensor(n, device=self.world.device)]
            )
        engine.train()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return (total[0] / total[1].clamp_min(1)).item()

    def val_loader(self) -> DataLoader:
        """The whole val split in order, for evaluation on one rank (EMA weights)."""
        return DataLoader(
            self.val_set,
            sampler=[(i, i) for i in range(len(self.val_set))],
            batch_size=self.micro_batch,
            collate_fn=collate,
        )

    def _write_probe(self, engine, ema: Ema | None, writer: MetricsWriter, done: int) -> None:
        """kNN and linear probes on the labels of the train/val splits (rank 0 fits and logs).

        Probing the online weights is a collective (every rank runs the forward: ZeRO-3 gathers
        parameters); probing the EMA runs a private copy on rank 0 only."""
        from nepa_scale.eval.probes import run_probes

        c = self.config
        if not hasattr(self, "probe_sets"):
            self.probe_sets = (
                build_dataset(c.data, "train", self.arch.image_size, train=False),
                build_dataset(c.data, "val", self.arch.image_size, train=False),
            )
        kwargs = dict(
            causal=c.logging.probe_causal,
            k=c.logging.probe_k,
            limit=c.logging.probe_limit,
            device=self.world.device,
        )
        if c.logging.probe_ema:
            if not self.world.is_main:
                return
            model = NEPA(self.arch, attention="sdpa").to(self.world.device)
            model.load_state_dict(ema.state_dict())
            result = run_probes(model, *self.probe_sets, **kwargs)
        else:
            result = run_probes(engine, *self.probe_sets, dtype=self.dtype, **kwargs)
        images = done * c.budget.global_batch
        writer.write(
            {
                "kind": "eval",
                "step": done,
                "images_seen": images,
                "flops_seen": images * self.flops_per_image,
                **result.metrics(),
                "probe_weights": "ema" if c.logging.probe_ema else "online",
                "probe_causal": result.causal,
                "time": time.time(),
            }
        )

    def _write_eval(self, engine, ema: Ema | None, writer: MetricsWriter, done: int) -> None:
        result = self.task.evaluate(engine, ema)
        if result:
            images = done * self.config.budget.global_batch
            writer.write(
                {
                    "kind": "eval",
                    "step": done,
                    "images_seen": images,
                    "flops_seen": images * self.flops_per_image,
                    **result,
                    "time": time.time(),
                }
            )

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        gathered = [first_bad.clone() for _ in range(self.world.world_size)]
        if self.world.world_size > 1:
            dist.all_gather(gathered, first_bad)
        bad = {rank: int(t.item()) for rank, t in enumerate(gathered) if int(t.item()) < NO_STEP}
        if bad:
            step = min(bad.values())
            hint = ""
            if self.precision == "bf16" and not self.config.deepspeed.check_grad_overflow:
                hint = "; if it recurs on resume, deepspeed.check_grad_overflow=true skips such steps"
            raise NonFiniteLoss(
                f"non-finite loss at step {step} on rank(s) {sorted(bad)}: stopping (no checkpoint written after it){hint}"
            )

    def _loop(self, engine, ema: Ema | None, start_step: int, total_steps: int) -> TrainResult:
        c, world, run = self.config, self.world, self.run
        preempt = self.preempt or PreemptionFlag().install()
        writer = MetricsWriter(
            run, world.is_main, c.logging.tensorboard, c.logging.wandb_project, c.to_dict()
        )
        bar = progress_bar(c.logging.progress, world.is_main, total_steps, start_step)
        peak = device_peak_tflops(world.device, c.logging.device_peak_tflops)
        meter = self.meter
        meter.started = time.perf_counter()  # throughput counts from here, not from start-up
        self.first_bad = torch.full((), NO_STEP, dtype=torch.long, device=world.device)
        skipped: list[str] = []
        steps_per_epoch = self.sampler.steps_per_epoch
        batches = None
        status, step = "completed", start_step
        try:
            if start_step == 0 and self.task.eval_at_start():
                self._write_eval(engine, ema, writer, 0)  # the held-out loss at initialisation
            for step in range(start_step, total_steps):
                epoch, step_in_epoch = divmod(step, steps_per_epoch)
                if batches is None or step_in_epoch == 0:
                    self.sampler.set_position(epoch, step_in_epoch)
                    batches = iter(self._loader(self.sampler))
                skipped += self.train_step(engine, batches, step)
                if ema is not None:
                    ema.update(engine.module)
                done = step + 1
                self.current_step = done
                if bar is not None:
                    bar.update(1)
                last = done == total_steps
                if done % c.logging.log_every == 0 or last:
                    self._check_finite(self.first_bad)
                    record = self._train_record(engine, meter, done, peak)
                    self.task.annotate(record)
                    writer.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    self._report_skipped(skipped)  # collective when world_size > 1
                    skipped = []
                    meter.reset()
                if self.task.eval_due(done, last):
                    self._write_eval(engine, ema, writer, done)
                if c.logging.probe_every and (done % c.logging.probe_every == 0 or last):
                    self._write_probe(engine, ema, writer, done)
                stop = preempt.agreed(self.control_group)
                if done % c.checkpoint.every == 0 or last or stop:
                    self._check_finite(self.first_bad)
                    self._save(engine, ema, done, "preempted" if stop else ("final" if last else "periodic"))
                if stop and not last:
                    status, step = "preempted", done
                    break
                step = done
        except BaseException as exc:
            if world.is_main:
                run.update_run(
                    status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0], failed_at_step=step
                )
            raise
        finally:
            if preempt is not self.preempt:
                preempt.uninstall()
            writer.close()
            if bar is not None:
                bar.close()
        if world.is_main:
            fields = {"status": status, "step": step, "images_seen": step * c.budget.global_batch}
            if status == "preempted":
                fields["preempted_by"] = preempt.received.name if preempt.received else "peer rank"
                log.info(
                    "preempted (%s) at step %d: checkpoint committed, exiting with %d for requeue",
                    fields["preempted_by"],
                    step,
                    REQUEUE_EXIT_CODE,
                )
            else:
                fields["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            run.update_run(**fields)
        barrier()
        return TrainResult(status, step, total_steps, REQUEUE_EXIT_CODE if status == "preempted" else 0)

    def train_step(self, engine, batches, step: int, timer: PhaseTimer = NO_TIMER) -> list[str]:
        """One optimizer step: per micro-batch, forward + loss, ``engine.backward``, ``engine.step``
        (DeepSpeed steps the optimizer at the accumulation boundary). Nothing here waits for the
        device; ``timer`` marks the phases for the benchmark. Returns the paths of skipped files."""
        skipped: list[str] = []
        for _ in range(self.sampler.accumulation_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - wait_start
            if batch.pending is not None:  # data.decode=device
                batch = decode_on_device(
                    batch, self.world.device, self.arch.image_size, self.config.data.interpolation
                )
            skipped += [s.path for s in batch.skipped]
            if len(batch.images):
                images = to_model_input(batch.images, self.world.device, self.dtype)
            else:  # every file of the micro-batch unreadable: a zero-weight step
                shape = (1, self.arch.in_chans, self.arch.image_size, self.arch.image_size)
                images = torch.zeros(shape, device=self.world.device, dtype=self.dtype)
            timer.mark("data")
            loss, stats = self.task.micro_step(engine, images, batch.labels)
            timer.mark("forward")
            engine.backward(loss * (0.0 if len(batch.images) == 0 else 1.0))
            timer.mark("backward")
            engine.step()
            timer.mark("optimizer")
            self.meter.add(stats, len(batch.images), wait)
            self.first_bad = torch.where(
                ~torch.isfinite(stats["loss"]) & (self.first_bad == NO_STEP), step + 1, self.first_bad
            )
        return skipped

    def _train_record(self, engine, meter: IntervalMeter, done: int, peak: float | None) -> dict:
        c, world = self.config, self.world
        means = meter.means()
        keys = sorted(means)
        stats = torch.stack(
            [*(means[k] for k in keys), torch.tensor(float(meter.images), device=world.device)]
        )
        if world.world_size > 1:
            dist.all_reduce(stats)
            stats[:-1] /= world.world_size
        elapsed = meter.elapsed()
        img_per_s = stats[-1].item() / elapsed
        tflops = img_per_s * self.flops_per_image / 1e12
        grad_norm = engine.get_global_grad_norm()
        return {
            "kind": "train",
            "step": done,
            "images_seen": done * c.budget.global_batch,
            "flops_seen": done * c.budget.global_batch * self.flops_per_image,
            "flop_convention": c.budget.flop_convention,
            **{key: stats[i].item() for i, key in enumerate(keys)},
            "lr": max(engine.get_lr()),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "img_per_s": img_per_s,
            "tflops_per_s": tflops,
            "mfu": tflops / peak if peak else None,
            "max_memory_gb": max_memory_gb(world.device),
            "data_wait_frac": min(1.0, meter.data_wait / elapsed),
            "time": time.time(),
        }

    def _report_skipped(self, paths: list[str]) -> None:
        gathered: list[list[str]] = [paths]
        if self.world.world_size > 1:
            gathered = [[] for _ in range(self.world.world_size)]
            dist.all_gather_object(gathered, paths)
        flat = [p for part in gathered for p in part]
        if self.world.is_main and flat:
            known = self.run.read_run().get("skipped_files", [])
            self.run.update_run(skipped_files=known + flat)
            log.warning(
                "skipped %d unreadable image file(s): %s",
                len(flat),
                ", ".join(flat[:5]) + (" ..." if len(flat) > 5 else ""),
            )


def train(config: RunConfig, preempt: PreemptionFlag | None = None) -> TrainResult:
    return Trainer(config, preempt).fit()
