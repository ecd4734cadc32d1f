"""One training run through DeepSpeed: the loop, over small components.

``Trainer.__init__`` resolves everything that needs no engine (world, task, step settings, data,
run length) and checks the data, so bad input fails before DeepSpeed starts. ``fit`` builds the
engine (resuming from the newest committed checkpoint) and runs ``train``, which reads top to
bottom: per step, train, maybe log, maybe evaluate, maybe checkpoint, maybe stop on preemption.

The components: the task (``tasks/``: model, loss, evaluation), the step settings
(``settings.py``), the optimizer and lr schedule (``schedule.py``), the checkpointer
(``checkpoint.py``: resume planning and the resume rule, save, load, the best EMA weights), the
EMA (``ema.py``), the evaluator (``evaluator.py``), the metrics writer and progress
(``metrics.py``), the preemption flag (``preemption.py``), how an attempt ends (``outcomes.py``),
compile and float8 (``acceleration.py``), provenance (``provenance.py``) and the run record
(``nepa_scale/rundir.py``).

A resumed run is indistinguishable from an uninterrupted one: weights, optimizer, lr schedule,
data position (a function of the step), per-rank RNG states, the EMA and a log interval cut short
are all restored.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Iterator

import deepspeed
import numpy as np
import torch

from nepa_scale.config import RunConfig
from nepa_scale.data import Batch, ResumableBatchSampler, batch_loader, check_training_data, to_model_input
from nepa_scale.data.device_decode import decode_on_device
from nepa_scale.engine.acceleration import apply_compile, apply_float8
from nepa_scale.engine.checkpoint import Checkpointer, ResumePlan
from nepa_scale.engine.distributed import (
    World,
    barrier,
    control_group,
    deepspeed_config,
    is_peer_loss,
    world_from_env,
)
from nepa_scale.engine.ema import Ema
from nepa_scale.engine.evaluator import Evaluator
from nepa_scale.engine.fingerprint import already_complete
from nepa_scale.engine.health import LossWatch, report_skipped
from nepa_scale.engine.metrics import (
    NO_TIMER,
    IntervalMeter,
    MetricsWriter,
    PhaseTimer,
    Progress,
    device_peak_tflops,
    train_record,
)
from nepa_scale.engine.outcomes import TrainResult, failure, join_world, owner_agreed, stopped
from nepa_scale.engine.preemption import PreemptionFlag
from nepa_scale.engine.provenance import record_start
from nepa_scale.engine.schedule import build_optimizer, check_schedule, cooldown_start
from nepa_scale.engine.settings import check_loggers, resolve_step_settings
from nepa_scale.engine.tasks import TASKS, Task, TaskContext
from nepa_scale.errors import ConfigError, DataError, RunBusy
from nepa_scale.memory import device_memory_gb
from nepa_scale.models import NEPA, resolve_backend
from nepa_scale.ownership import Claim, claim
from nepa_scale.rundir import RunDir

log = logging.getLogger("nepa_scale.train")


def setup_logging(world: World) -> None:
    level = logging.INFO if world.is_main else logging.WARNING
    fmt = f"%(asctime)s [rank {world.rank}] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        preempt: PreemptionFlag | None = None,
        on_commit: Callable[[int], None] | None = None,
        refusal: RunBusy | None = None,
    ):
        """``preempt``: a flag installed by the caller before start-up (the launcher does, so that a
        signal during start-up is not lost); by default ``train`` installs its own. ``on_commit``:
        called on rank 0 with the step of each committed checkpoint (the launcher submits a WSD
        trunk's branches from it). ``refusal``: rank 0 was refused the run's lock (``train``)."""
        self.config, self.preempt, self.on_commit = config, preempt, on_commit
        check_loggers(config.logging)
        self.world = join_world(config)
        self.control_group = control_group(self.world)
        owner_agreed(self.world, self.control_group, refusal, config.output_dir)
        setup_logging(self.world)
        self.run = RunDir(config.output_dir)
        task_class = TASKS[config.task]
        self.arch = task_class.resolve_arch(config)
        auto = config.model.grad_checkpointing == "auto"
        self.settings = resolve_step_settings(
            config,
            self.arch,
            self.world.world_size,
            self.world.device.type,
            memory_gb=device_memory_gb(self.world.device) if auto else None,
        )
        if auto:
            log.info(
                "model.grad_checkpointing=auto: %d of %d blocks (predicted peak %.1f GiB)",
                self.settings.checkpointed_blocks,
                self.arch.depth,
                self.settings.predicted_memory_gb,
            )
        self.flops_per_image = task_class.flops_per_image(config, self.arch)
        self.train_set = task_class.train_dataset(config, self.arch)
        check_training_data(self.train_set, config.budget.global_batch)
        self.sampler = ResumableBatchSampler(
            len(self.train_set),
            config.budget.global_batch,
            self.settings.micro_batch,
            self.world.rank,
            self.world.world_size,
            config.seed,
        )
        self.total_steps = config.budget.total_steps(self.sampler.steps_per_epoch, self.flops_per_image)
        check_schedule(config.optim, self.total_steps)
        branch_point = cooldown_start(config.optim, self.total_steps)
        if config.branch.step is not None and config.branch.step != branch_point:
            raise ConfigError(
                f"branch.step: {config.branch.step} is not this run's cooldown start (step {branch_point} "
                f"of {self.total_steps}, optim.cooldown_fraction={config.optim.cooldown_fraction})"
            )
        # Fine-tuning evaluates every epoch unless logging.eval_every says otherwise (a few-label
        # split's epoch can be two steps).
        per_epoch = task_class.eval_each_epoch and not config.logging.eval_every
        epoch_steps = self.sampler.steps_per_epoch if per_epoch else None
        self.evaluator = Evaluator(
            config,
            self.arch,
            self.world,
            self.settings,
            epoch_steps,
            task_class.val_dataset(config, self.arch),
        )
        self.task: Task = task_class(
            TaskContext(config, self.arch, self.world, self.settings, self.evaluator)
        )
        # The probe's fixed images, drawn and checked now: data a probe cannot use (one class) fails
        # before the engine starts, not at the first probe.
        self.probe_subsets = self.evaluator.probe_record()
        self.checkpointer = Checkpointer(self.run, config, self.world, self.settings, self.total_steps)
        self.meter = IntervalMeter()  # restored on resume: an interval cut by a preemption logs as if whole
        hint = ""
        if self.settings.precision == "bf16" and not config.deepspeed.check_grad_overflow:
            hint = "; if it recurs on resume, deepspeed.check_grad_overflow=true skips such steps"
        self.loss_watch = LossWatch(self.world, hint)

    # -- data
    def batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches from global step ``start_step`` on, epoch after epoch (a new
        loader per epoch, started when the epoch's first batch is asked for)."""
        epoch, step_in_epoch = divmod(start_step, self.sampler.steps_per_epoch)
        c = self.config
        while True:
            self.sampler.set_position(epoch, step_in_epoch)
            pin = self.world.device.type == "cuda"
            yield from batch_loader(
                self.train_set, self.sampler, c.data.num_workers, c.seed, pin, c.data.worker_start
            )
            epoch, step_in_epoch = epoch + 1, 0

    # -- building
    def build_model(self) -> NEPA:
        """The task's model with its attention backend and compile scope (on the CPU; DeepSpeed moves it).

        Identical initial weights and RNG streams on every rank: torch (init, RoPE rescale, drop-path),
        numpy and python (Mixup/CutMix draw from them); all three are checkpointed per rank."""
        c = self.config
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        random.seed(c.seed)
        model = self.task.build_model()
        model.set_attention(
            backend=resolve_backend(c.model.attention, self.world.device, self.settings.dtype)
        )
        if c.model.float8:
            converted = apply_float8(model)
            log.info("model.float8: %d linear layers of the blocks in float8", converted)
        apply_compile(model, c.model.compile, c.model.compile_mode)
        return model

    def build_optimizer(self, model: torch.nn.Module):
        """AdamW over the task's parameter groups and the run's lr schedule."""
        c = self.config
        peak_lr = c.optim.peak_lr(c.budget.global_batch)
        groups = self.task.optimizer_groups(model, peak_lr)
        return build_optimizer(groups, c.optim, peak_lr, self.total_steps, self.world.device)

    def build_engine(self, resume: bool = True) -> tuple[object, Ema | None, int]:
        """Model, optimizer and DeepSpeed engine, resumed from the newest committed checkpoint unless
        ``resume`` is False (the benchmark); returns (engine, ema, start step)."""
        c = self.config
        plan = (
            self.checkpointer.plan_resume(self.probe_subsets) if resume else None
        )  # a refusal needs no model
        model = self.build_model()
        ema = Ema(model, c.checkpoint.ema_decay, c.checkpoint.ema_warmup) if c.checkpoint.ema_decay else None
        optimizer, scheduler = self.build_optimizer(model)
        ds_config = deepspeed_config(
            c, self.world, self.settings, load_universal=bool(plan and plan.load_universal)
        )
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        start_step = 0
        if plan is not None:
            start_step, rank_state = self.checkpointer.load(engine, plan, ema)
            self.meter.restore(rank_state.get("interval", {}), self.world.device)
        if resume:
            self._record_start(model, plan, start_step)
        return engine, ema, start_step

    def _record_start(self, model: NEPA, plan: ResumePlan | None, start_step: int) -> None:
        c, world, settings = self.config, self.world, self.settings
        params = sum(p.numel() for p in model.parameters())
        backend = model.blocks[0].attn.backend
        if world.is_main:
            record_start(
                self.run,
                c,
                plan,
                start_step,
                self.probe_subsets,
                world_size=world.world_size,
                precision=settings.precision,
                attention_backend=backend,
                checkpointed_blocks=settings.checkpointed_blocks,
                micro_batch=settings.micro_batch,
                total_steps=self.total_steps,
                steps_per_epoch=self.sampler.steps_per_epoch,
                flop_convention=c.budget.flop_convention,
                flops_per_image=self.flops_per_image,
                params=params,
            )
        barrier()
        log.info(
            "run %s: %s (%s params), %d steps of %d images (%d x %d micro-batches x %d ranks), %s, "
            "attention=%s, compile=%s, zero=%d, from step %d",
            self.run.root,
            c.model.name,
            f"{params:,}",
            self.total_steps,
            c.budget.global_batch,
            settings.micro_batch,
            settings.accumulation_steps,
            world.world_size,
            settings.precision,
            backend,
            c.model.compile,
            c.deepspeed.zero_stage,
            start_step,
        )

    # -- the run
    def fit(self) -> TrainResult:
        complete = already_complete(self.run, self.config)
        if complete is not None:
            log.info(complete)
            return TrainResult(
                "completed", self.total_steps, self.total_steps, 0, start_step=self.total_steps
            )
        try:
            engine, ema, start_step = self.build_engine()
        except BaseException as exc:  # the engine's build is collective too: a rank may be lost here
            if self.world.world_size > 1 and is_peer_loss(exc):
                self._raise_for(exc, None, 0)
            raise  # a refused resume or a bad setting: the run's record stays as it was
        return self.train(engine, ema, start_step)

    def train(self, engine, ema: Ema | None, start_step: int) -> TrainResult:
        c, world, run = self.config, self.world, self.run
        total = self.total_steps
        preempt = self.preempt or PreemptionFlag().install()
        writer = MetricsWriter(
            run, world.is_main, c.logging, c.to_dict(), c.budget.global_batch, self.flops_per_image
        )
        progress = Progress(c.logging.progress, world.is_main, total, start_step)
        peak = device_peak_tflops(world.device, c.logging.device_peak_tflops)
        self.meter.started = time.perf_counter()  # throughput counts from here, not from start-up
        skipped: list[tuple[str, str]] = []
        step = start_step
        try:
            if preempt.agreed(self.control_group):  # the notice came during start-up: nothing to save
                return self._stopped(preempt, step, start_step)
            if start_step == 0:  # the untrained model: the baseline of the loss and the probes
                self._evaluate(
                    writer, engine, ema, 0, self.task.eval_at_start, self.evaluator.probe_due(0, False)
                )
            batches = self.batches(start_step)
            for step in range(start_step, total):
                skipped += self.train_step(engine, batches, step)
                if ema is not None:
                    ema.update(engine.module, step)
                done, last = step + 1, step + 1 == total
                progress.step()
                if done % c.logging.log_every == 0 or last:
                    record = self._log_interval(engine, writer, done, peak, skipped)
                    progress.interval(record)
                    self.loss_watch.interval(record["loss"])
                    skipped = []
                self._evaluate(
                    writer,
                    engine,
                    ema,
                    done,
                    self.evaluator.eval_due(done, last),
                    self.evaluator.probe_due(done, last),
                )
                stop = preempt.agreed(self.control_group)
                kept = done in c.checkpoint.keep_steps
                if done % c.checkpoint.every == 0 or last or stop or kept:
                    self.loss_watch.check_finite()
                    reason = "preempted" if stop else ("final" if last else "kept" if kept else "periodic")
                    self.checkpointer.save(engine, ema, done, reason, {"interval": self.meter.partial()})
                    if self.on_commit is not None and world.is_main:
                        self.on_commit(done)
                step = done
                if stop and not last:
                    return self._stopped(preempt, done, start_step)
            self.loss_watch.check_learned(total - start_step, c.logging.log_every)
        except BaseException as exc:
            self._raise_for(exc, step, start_step)
        finally:
            if preempt is not self.preempt:
                preempt.uninstall()
            writer.close()
            progress.close()
        if world.is_main:
            run.completed(step, c.budget.global_batch)
            log.info("run %s completed: step %d of %d", run.root, step, total)
        barrier()
        return TrainResult("completed", step, total, 0, start_step)

    def _evaluate(
        self, writer: MetricsWriter, engine, ema: Ema | None, step: int, held_out: bool, probe: bool
    ) -> None:
        """One evaluation line at ``step``: the task's held-out evaluation and the probes, as due."""
        values: dict = {}
        if held_out:
            evaluation = self.task.evaluate(engine, ema, step)
            values |= evaluation.metrics
            if evaluation.record is not None:
                writer.write_record(evaluation.record_file, evaluation.record)
            if evaluation.best_score is not None and self.world.is_main:
                if self.checkpointer.keep_best(ema, evaluation.best_score, step):
                    log.info("step %d: best EMA weights so far kept (%.4f)", step, evaluation.best_score)
            barrier()  # rank 0 may have scored the EMA and kept its weights
        if probe:
            values |= self.evaluator.probe(engine, ema)
        writer.write_eval(step, values)

    def _raise_for(self, exc: BaseException, step: int | None, start_step: int) -> None:
        """Raise what ``exc`` means for the run (``outcomes.failure``), with ``exc`` as its cause."""
        bytes_needed = self.checkpointer.checkpoint_bytes
        meaning = failure(exc, self.run, self.world, self.config, bytes_needed, step, start_step)
        if meaning is exc:
            raise exc
        raise meaning from exc

    def _stopped(self, preempt: PreemptionFlag, step: int, start_step: int) -> TrainResult:
        return stopped(self.run, self.world, self.config, preempt, step, start_step, self.total_steps)

    def train_step(
        self, engine, batches: Iterator[Batch], step: int, timer: PhaseTimer = NO_TIMER
    ) -> list[tuple[str, str]]:
        """One optimizer step: per micro-batch, forward + loss, ``engine.backward``, ``engine.step``
        (DeepSpeed steps the optimizer at the accumulation boundary). Nothing here waits for the
        device; ``timer`` marks the phases for the benchmark. Returns the skipped files (path, why)."""
        skipped: list[tuple[str, str]] = []
        device, dtype = self.world.device, self.settings.dtype
        for _ in range(self.settings.accumulation_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - wait_start
            if batch.pending is not None:  # data.decode=device
                batch = decode_on_device(batch, device, self.arch.image_size, self.config.data.interpolation)
            skipped += [(s.path, s.reason) for s in batch.skipped]
            if len(batch.images):
                images = to_model_input(batch.images, device, dtype)
            else:  # every file of the micro-batch unreadable: a zero-weight step
                shape = (1, self.arch.in_chans, self.arch.image_size, self.arch.image_size)
                images = torch.zeros(shape, device=device, dtype=dtype)
            timer.mark("data")
            loss, stats = self.task.micro_step(engine, images, batch.labels)
            timer.mark("forward")
            engine.backward(loss * (0.0 if len(batch.images) == 0 else 1.0))
            timer.mark("backward")
            engine.step()
            timer.mark("optimizer")
            self.meter.add(stats, len(batch.images), wait)
            self.loss_watch.update(stats["loss"], step)
        return skipped

    def _log_interval(
        self, engine, writer: MetricsWriter, done: int, peak: float | None, skipped: list[tuple[str, str]]
    ) -> dict:
        """The interval's train line (collective), after the checks that would make it meaningless."""
        self.loss_watch.check_finite()
        c = self.config
        grad_norm = engine.get_global_grad_norm()
        record = train_record(
            self.meter,
            self.world,
            done,
            c.budget.global_batch,
            self.flops_per_image,
            c.budget.flop_convention,
            peak,
            lr=max(engine.get_lr()),
            grad_norm=float(grad_norm) if grad_norm is not None else None,
        )
        self.task.annotate(record)
        writer.write(record)
        all_skipped = report_skipped(self.world, self.run, skipped)  # collective when world_size > 1
        if record["images_in_interval"] == 0:
            first = done - (done - 1) % c.logging.log_every
            raise DataError(
                f"data: no readable image in steps {first}-{done} ({len(all_skipped)} files skipped, "
                f"e.g. {all_skipped[0] if all_skipped else '?'}): stopping"
            )
        self.meter.reset()
        return record


def train(
    config: RunConfig,
    preempt: PreemptionFlag | None = None,
    on_commit: Callable[[int], None] | None = None,
    owner: Claim | None = None,
) -> TrainResult:
    """Train (or resume) the run as its directory's owner: rank 0 takes the lock before anything is
    written there (unless the caller did: ``owner``) and gives it up however it ends."""
    rank, _, world_size = world_from_env()
    owner = owner or claim(config.output_dir, "train", rank)
    try:
        if owner.refusal is not None and world_size == 1:
            raise owner.refusal
        return Trainer(config, preempt, on_commit, owner.refusal).fit()
    finally:
        owner.release()
