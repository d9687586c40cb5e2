"""Training data whose order is a pure function of (seed, batch number), so a resumed run sees
exactly the batches an uninterrupted one would.

The train loader is endless: batch b of the run is slice ``perm_e[(i * world + rank) * B ...]`` of
epoch e = b // batches_per_epoch, i = b % batches_per_epoch, where perm_e is a permutation drawn
from a generator seeded with (seed, e). Every replica of a data-parallel run reads its own share of
the same permutation (the last incomplete batch of an epoch is dropped). Each item's augmentation
draws from its own generator seeded with (seed, epoch, index), so it too is reproducible whatever
the number of loader workers. A module resumes the stream by starting it at its batch counter.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pathanat.data.dataset import SliceDataModule
from pathanat.errors import PathanatError

# What a derived seed is for: each use has its own stream, whatever its keys.
PERMUTATION, ITEM, STEP = 1, 2, 3


def derived_seed(purpose: int, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` (PERMUTATION, ITEM or STEP) from a tuple of integers.

    Distinct (purpose, keys) give unrelated streams. The number of keys is part of the entropy:
    SeedSequence alone maps [7, 3] and [7, 3, 0] to the same state."""
    entropy = [int(purpose), len(keys), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


class StepBatchSampler(Sampler):
    """Endless batches of ``(item_seed, index)`` pairs for one replica, from batch ``start``."""

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise PathanatError(
                f"training split has {n} slices, fewer than one batch of {batch_size} per replica "
                f"x {world} replicas; lower data.batch_size"
            )
        self.batch_size, self.seed, self.rank, self.world, self.start = (
            batch_size, seed, rank, world, start,
        )
        self.n = n

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derived_seed(PERMUTATION, self.seed, epoch))
        return torch.randperm(self.n, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start
        epoch, perm = -1, None
        while True:
            e, i = divmod(batch, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            first = (i * self.world + self.rank) * self.batch_size
            indices = perm[first : first + self.batch_size].tolist()
            yield [(derived_seed(ITEM, self.seed, epoch, index), index) for index in indices]
            batch += 1


class SeededItems(Dataset):
    """``dataset[index]`` computed under its own RNG seed (for reproducible augmentation)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class TrainingDataModule(SliceDataModule):
    """The slice cache's loaders, with the train stream resumable at any batch (see module doc).

    ``start_batch`` is read from the training module when the loader is built, i.e. after a
    checkpoint has been restored.
    """

    def __init__(self, cache, seed: int = 0, **kwargs) -> None:
        super().__init__(cache, **kwargs)
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        start = getattr(trainer.lightning_module, "batches_seen", 0) if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        dataset = self.datasets["train"]
        return DataLoader(
            SeededItems(dataset),
            batch_sampler=StepBatchSampler(
                len(dataset), self.batch_size, self.seed, rank, world, start
            ),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets["val"],
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
