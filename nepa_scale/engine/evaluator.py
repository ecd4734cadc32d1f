"""Evaluation during training: held-out scores on the val split and probes, on a schedule it owns.

Tasks say what their evaluation computes (``Task.evaluate``) with the evaluator's pieces: a
held-out score over val micro-batches on every rank, and the whole val split in order for one
rank. When to evaluate is decided here: every ``logging.eval_every`` steps, at the end, every
epoch for tasks that ask for it, and at step 0 for tasks that report the initial loss; probes
every ``logging.probe_every`` steps, at the end and at step 0, on fixed class-balanced subsets of
the train and val splits (``probe_subsets``, recorded in run.json), scored on the val subset or,
with ``logging.probe_folds``, by cross-validation over both (``probe_folds``, recorded beside them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from nepa_scale.config import DataConfig, RunConfig
from nepa_scale.data import ResumableBatchSampler, batch_loader, build_dataset, collate, to_model_input
from nepa_scale.engine.distributed import World
from nepa_scale.engine.settings import StepSettings
from nepa_scale.errors import ConfigError, DataError
from nepa_scale.eval.probes import (
    ProbeFolds,
    ProbeSubset,
    check_probe_subsets,
    cross_validated_probe,
    probe_datasets,
    probe_features,
    probe_folds,
    probe_pooled,
    probe_subset,
)
from nepa_scale.models import NEPA
from nepa_scale.models.arch import NepaArch

if TYPE_CHECKING:
    from nepa_scale.engine.ema import Ema


class Evaluator:
    def __init__(
        self,
        config: RunConfig,
        arch: NepaArch,
        world: World,
        settings: StepSettings,
        epoch_steps: int | None = None,
        val_set=None,
    ):
        """``epoch_steps``: also evaluate every this many steps (a task that evaluates each epoch).
        ``val_set``: the task's evaluation data (default: the val split with the eval transform)."""
        self.config, self.arch, self.world, self.settings = config, arch, world, settings
        self.epoch_steps = epoch_steps
        self.val_set = (
            val_set
            if val_set is not None
            else build_dataset(config.data, "val", arch.image_size, train=False)
        )

    @functools.cached_property
    def val_sampler(self) -> ResumableBatchSampler | None:
        """The val split in order, as micro-batches across ranks (None when it is smaller than one
        micro-batch per rank); built on first use (segmentation scores whole images instead)."""
        per_step = self.settings.micro_batch * self.world.world_size
        if len(self.val_set) < per_step:
            return None
        return ResumableBatchSampler(
            len(self.val_set),
            per_step,
            self.settings.micro_batch,
            self.world.rank,
            self.world.world_size,
            shuffle=False,
        )

    # -- the schedule
    def eval_due(self, done: int, last: bool) -> bool:
        every = self.config.logging.eval_every
        return (
            last
            or bool(every and done % every == 0)
            or bool(self.epoch_steps and done % self.epoch_steps == 0)
        )

    def probe_due(self, done: int, last: bool) -> bool:
        """Probes every ``logging.probe_every`` steps, at the end, and at step 0 (the untrained
        model: the baseline a probe is read against)."""
        every = self.config.logging.probe_every
        return bool(every) and (last or done % every == 0)

    # -- what tasks evaluate with
    @torch.no_grad()
    def held_out(
        self,
        engine,
        score: Callable[[Any, Any], dict[str, torch.Tensor]],
        limit: int | None = -1,
    ) -> dict[str, torch.Tensor] | None:
        """Means of ``score(output, batch)``'s tensors (scalars, or any shape: a Gram matrix) over val
        micro-batches, weighted by batch size, summed in fp64 across ranks (one all-reduce). ``limit=-1`` takes
        ``logging.eval_batches`` micro-batches per rank; None the whole split. None when the split
        is smaller than one micro-batch per rank."""
        if self.val_sampler is None:
            return None
        limit = self.config.logging.eval_batches if limit == -1 else limit
        device = self.world.device
        engine.eval()
        sums: dict[str, torch.Tensor] = {}
        images = torch.zeros(1, device=device, dtype=torch.float64)
        self.val_sampler.set_position(0, 0)
        pin = device.type == "cuda"
        loader = batch_loader(
            self.val_set,
            self.val_sampler,
            self.config.data.num_workers,
            self.config.seed,
            pin,
            self.config.data.worker_start,
        )

        def add(batch, weight: float) -> None:
            values = score(engine(to_model_input(batch.images, device, self.settings.dtype)), batch)
            n = float(len(batch.images)) * weight
            for key, value in values.items():
                value = value.to(device, torch.float64) * n
                sums[key] = sums[key] + value if key in sums else value
            images.add_(n)

        done = 0
        for batch in loader:
            if (limit is not None and done >= limit) or len(batch.images) == 0:
                break
            add(batch, 1.0)
            done += 1
        if limit is None or done < limit:
            # The sampler yields whole steps; the split's remainder is shared out here, so that "the
            # whole split" is all of it. Every rank runs one forward (ZeRO-3's is a collective): a
            # rank with no image left repeats the first one at weight zero.
            covered = self.val_sampler.steps_per_epoch * self.val_sampler.global_batch
            tail = list(range(covered, len(self.val_set)))
            if tail:
                mine = tail[self.world.rank :: self.world.world_size]
                batch = collate([self.val_set[(i, i)] for i in (mine or tail[:1])])
                add(batch, 1.0 if mine else 0.0)
        engine.train()
        keys = sorted(sums)
        flat = torch.cat([images] + [sums[k].reshape(-1) for k in keys])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        total, offset, means = flat[0].clamp_min(1), 1, {}
        for key in keys:
            size = sums[key].numel()
            means[key] = (flat[offset : offset + size] / total).reshape(sums[key].shape).cpu()
            offset += size
        return means

    def val_loader(self) -> DataLoader:
        """The whole val split in order, for evaluation on one rank (EMA weights)."""
        return DataLoader(
            self.val_set,
            sampler=[(i, i) for i in range(len(self.val_set))],
            batch_size=self.settings.micro_batch,
            collate_fn=collate,
        )

    def ema_model(self, ema: Ema) -> NEPA:
        """A private model holding the EMA weights, on this rank's device."""
        model = NEPA(self.arch, attention="sdpa").to(self.world.device)
        model.load_state_dict(ema.state_dict())
        return model.eval()

    # -- probes
    @functools.cached_property
    def probe_subsets(self) -> tuple[ProbeSubset, ProbeSubset] | None:
        """The probe's fixed images of the train and val splits (None when probes are off)."""
        lg = self.config.logging
        if not lg.probe_every:
            return None
        train = probe_subset(self.probe_train_set, "train", lg.probe_train_per_class, lg.probe_subset_seed)
        val = probe_subset(self.val_set, "val", lg.probe_val_per_class, lg.probe_subset_seed)
        check_probe_subsets(train, val, "logging.probe_every")
        return train, val

    @functools.cached_property
    def probe_folds(self) -> ProbeFolds | None:
        """The cross-validation folds over both probe subsets (None: probes off, or no folds asked),
        drawn from ``logging.probe_subset_seed``: the same for every run of a study."""
        lg = self.config.logging
        if self.probe_subsets is None or not lg.probe_folds:
            return None
        train, val = self.probe_subsets
        return probe_folds(
            self.probe_train_set, self.val_set, train, val, lg.probe_folds, lg.probe_subset_seed
        )

    def probe_record(self) -> dict[str, Any] | None:
        """What run.json records of the probe's images: the same for every run of a study."""
        if self.probe_subsets is None:
            return None
        lg = self.config.logging
        train, val = self.probe_subsets
        record = {
            "seed": lg.probe_subset_seed,
            "train_per_class": lg.probe_train_per_class,
            "val_per_class": lg.probe_val_per_class,
            "train": train.record(),
            "val": val.record(),
        }
        if self.probe_folds is not None:  # absent without folds: records from before them stay equal
            record["folds"] = self.probe_folds.record()
        return record

    @functools.cached_property
    def probe_train_set(self):
        """The train split with the evaluation transform (what the probe's features are of)."""
        return build_dataset(self.config.data, "train", self.arch.image_size, train=False)

    def probe(self, engine, ema: Ema | None) -> dict[str, Any]:
        """kNN and linear probe on the fixed subsets. Every rank extracts its share of the features
        (a collective: ZeRO-3 gathers parameters; the EMA weights are on every rank); rank 0 fits
        the probes on the gathered features, on the device, and returns the metrics (others {})."""
        lg = self.config.logging
        train, val = self.probe_subsets
        model = self.ema_model(ema) if lg.probe_ema else engine
        extract = dict(
            causal=lg.probe_causal,
            batch_size=self.settings.micro_batch,
            device=self.world.device,
            dtype=torch.float32 if lg.probe_ema else self.settings.dtype,
            rank=self.world.rank,
            world_size=self.world.world_size,
            num_workers=self.config.data.num_workers,
            worker_start=self.config.data.worker_start,
        )
        sets = (self.probe_train_set, self.val_set, train, val)
        scoring = dict(k=lg.probe_k, causal=lg.probe_causal, seed=lg.probe_subset_seed)
        if self.probe_folds is not None:
            pooled = probe_pooled(model, *sets, self.probe_folds, **extract)
            if not self.world.is_main:
                return {}
            result = cross_validated_probe(*pooled, **scoring)
        else:
            data = probe_datasets(model, *sets, **extract)
            if not self.world.is_main:
                return {}
            result = probe_features(*data, **scoring)
        return {
            **result.metrics(),
            "probe_weights": "ema" if lg.probe_ema else "online",
            "probe_causal": result.causal,
        }


def check_probe_subsets_unchanged(recorded: dict | None, current: dict | None, data: DataConfig) -> None:
    """A resumed run probes the images it probed before: one curve, one probe."""
    if not recorded or not current or recorded == current:
        return

    def folds(record: dict) -> int | None:
        return (record.get("folds") or {}).get("k")

    for key, name in (
        ("seed", "probe_subset_seed"),
        ("train_per_class", "probe_train_per_class"),
        ("val_per_class", "probe_val_per_class"),
        ("folds", "probe_folds"),
    ):
        before, now = (folds(r) if key == "folds" else r.get(key) for r in (recorded, current))
        if before != now:
            raise ConfigError(
                f"logging.{name}: the run probed with {before} before (run.json probe_subsets), "
                f"now {now}: one run's probe curve needs one subset; set it back or start a new run"
            )
    raise DataError(
        f"data: the probe subsets drawn from {data.root or data.kind} differ from those the run "
        f"recorded ({recorded['train']} / {recorded['val']} / folds {recorded.get('folds')} before, "
        f"{current['train']} / {current['val']} / folds {current.get('folds')} now): "
        "the split's files changed since the run started"
    )
