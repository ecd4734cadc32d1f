"""Evaluation during training: held-out scores on the val split and probes, on a schedule it owns.

Tasks say what their evaluation computes (``Task.evaluate``) with the evaluator's pieces: a
held-out score over val micro-batches on every rank, and the whole val split in order for one
rank. When to evaluate is decided here: every ``logging.eval_every`` steps, at the end, every
epoch for tasks that ask for it, and at step 0 for tasks that report the initial loss; probes
every ``logging.probe_every`` steps and at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from nepa_scale.config import RunConfig
from nepa_scale.data import ResumableBatchSampler, batch_loader, build_dataset, collate, to_model_input
from nepa_scale.engine.distributed import World
from nepa_scale.engine.settings import StepSettings
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
        self._probe_sets = None

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
        every = self.config.logging.probe_every
        return bool(every) and (last or done % every == 0)

    # -- what tasks evaluate with
    @torch.no_grad()
    def held_out(
        self, engine, score: Callable[[Any, Any], torch.Tensor], limit: int | None = -1
    ) -> float | None:
        """Mean of ``score(output, batch)`` over val micro-batches, weighted by batch size, across
        ranks (a collective). ``limit=-1`` takes ``logging.eval_batches`` micro-batches per rank;
        None the whole split. None when the split is smaller than one micro-batch per rank."""
        if self.val_sampler is None:
            return None
        limit = self.config.logging.eval_batches if limit == -1 else limit
        device = self.world.device
        engine.eval()
        total = torch.zeros(2, device=device)
        self.val_sampler.set_position(0, 0)
        pin = device.type == "cuda"
        loader = batch_loader(
            self.val_set, self.val_sampler, self.config.data.num_workers, self.config.seed, pin
        )

        def add(batch, weight: float) -> None:
            value = score(engine(to_model_input(batch.images, device, self.settings.dtype)), batch)
            n = float(len(batch.images)) * weight
            total.add_(torch.stack([value.float().to(device) * n, torch.tensor(n, device=device)]))

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
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return (total[0] / total[1].clamp_min(1)).item()

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
    def probe(self, engine, ema: Ema | None) -> dict[str, Any]:
        """kNN and linear probes on the labels of the train/val splits (rank 0 fits them).

        Probing the online weights is a collective (every rank runs the forward: ZeRO-3 gathers
        parameters); probing the EMA runs a private copy on rank 0 only (others return {})."""
        from nepa_scale.eval.probes import run_probes

        lg = self.config.logging
        if self._probe_sets is None:
            self._probe_sets = tuple(
                build_dataset(self.config.data, split, self.arch.image_size, train=False)
                for split in ("train", "val")
            )
        kwargs = dict(causal=lg.probe_causal, k=lg.probe_k, limit=lg.probe_limit, device=self.world.device)
        if lg.probe_ema:
            if not self.world.is_main:
                return {}
            result = run_probes(self.ema_model(ema), *self._probe_sets, **kwargs)
        else:
            result = run_probes(engine, *self._probe_sets, dtype=self.settings.dtype, **kwargs)
        return {
            **result.metrics(),
            "probe_weights": "ema" if lg.probe_ema else "online",
            "probe_causal": result.causal,
        }
