"""A batch order that is a pure function of (seed, epoch, step), so a run resumes at the exact next sample.

Each epoch is one seeded permutation of the dataset, cut into global batches (the last partial
batch is dropped). Global step s of the epoch takes ``perm[s*B:(s+1)*B]``; data-parallel rank r takes
its contiguous slice of that batch, cut again into micro-batches for gradient accumulation. The set of
samples of a global step therefore does not depend on the world size, which is what lets a run
resume at another world size (elastic resume) and still see the same images in the same steps.
Every sample also carries its own augmentation seed, derived from (seed, epoch, position), so
the random crop an image gets does not depend on the worker or rank that loads it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

_SEED_STRIDE = 1_000_003  # a prime: distinct (epoch, position) pairs get distinct sample seeds


class ResumableBatchSampler:
    """Yields this rank's micro-batches of ``(index, sample_seed)`` for one epoch, from a start step."""

    def __init__(
        self,
        dataset_size: int,
        global_batch: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        per_rank, rest = divmod(global_batch, world_size)
        if rest or per_rank % micro_batch:
            raise ValueError(
                f"global_batch {global_batch} is not divisible by world size {world_size} x micro_batch {micro_batch}"
            )
        if dataset_size < global_batch:
            raise ValueError(
                f"dataset has {dataset_size} samples, fewer than one global batch of {global_batch}"
            )
        self.dataset_size = dataset_size
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = per_rank
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Start the next iteration at global step ``start_step`` of ``epoch``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        base_seed = (self.seed * _SEED_STRIDE + self.epoch) * _SEED_STRIDE
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * self.per_rank
            for micro in range(self.accumulation_steps):
                start = first + micro * self.micro_batch
                yield [
                    (perm[pos], (base_seed + pos) % 2**63) for pos in range(start, start + self.micro_batch)
                ]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation_steps
