"""Batches of an in-memory site: a seeded, resumable batch sampler (DDP-aware) and its loader."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from relaylearn.errors import DataError


class SiteBatchSampler(Sampler[list[int]]):
    """Yields index batches over ``num_items × num_replica`` draws, reshuffled every epoch.

    Deterministic given (seed, epoch). Under DDP every rank draws the same permutation and
    takes every ``world_size``-th batch, so ranks see disjoint data and the same batch count.
    """

    def __init__(self, num_items: int, batch_size: int, num_replica: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.num_replica = num_items, batch_size, num_replica
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of the next epoch to skip once: they were trained before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue mid-epoch: the next iteration is epoch ``epoch`` without its first ``batches_done`` batches."""
        self.epoch, self.skip = epoch, batches_done

    @property
    def total_batches(self) -> int:
        """Batches per epoch; in one process a lone last item joins the batch before it (BatchNorm fails on one image)."""
        draws = self.num_items * self.num_replica
        if self.world_size == 1 and draws % self.batch_size == 1:
            return max(1, draws // self.batch_size)
        return math.ceil(draws / self.batch_size)

    def __len__(self) -> int:
        return self.total_batches if self.world_size == 1 else max(1, self.total_batches // self.world_size)

    def _copies(self, g: torch.Generator) -> Iterator[Tensor]:
        """The epoch's ``num_replica`` shuffled copies of the items, one at a time."""
        for _ in range(self.num_replica):
            yield torch.randperm(self.num_items, generator=g)

    def _batches(self) -> Iterator[Tensor]:
        """The epoch's ``total_batches`` index batches, drawn lazily (one copy of the items in
        memory at a time); the last one takes every remaining draw (a lone last item joins it)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        last_size = self.num_items * self.num_replica - self.batch_size * (self.total_batches - 1)
        pieces: list[Tensor] = []  # of the batch being filled
        size, made = 0, 0
        for copy in self._copies(g):
            while len(copy):
                target = self.batch_size if made < self.total_batches - 1 else last_size
                pieces.append(copy[: target - size])
                copy, size = copy[target - size :], size + len(pieces[-1])
                if size == target:
                    yield torch.cat(pieces)
                    pieces, size, made = [], 0, made + 1

    def __iter__(self) -> Iterator[list[int]]:
        if self.total_batches < self.world_size:  # a rank without a batch would wait for the others forever
            raise DataError(
                f"{self.num_items * self.num_replica} training draws make {self.total_batches} batch(es) of {self.batch_size}, "
                f"fewer than the {self.world_size} processes; use a smaller batch size or fewer devices"
            )
        start, self.skip = self.skip, 0
        for j, batch in enumerate(self._batches()):
            i, rank = divmod(j, self.world_size)  # under DDP this rank takes every world_size-th batch
            if i >= len(self):
                return
            if rank == self.rank and i >= start:
                yield batch.tolist()


def site_loader(images: Tensor, labels: Tensor, batch_size: int, num_replica: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over an in-memory site: images [N,C,H,W], labels [N,H,W]; each item is a batch."""
    return batch_loader(images, labels, SiteBatchSampler(len(images), batch_size, num_replica, seed, rank, world_size), seed)


def batch_loader(images: Tensor, labels: Tensor, sampler, seed: int) -> DataLoader:
    """A loader over in-memory images [N,C,H,W] and labels [N,H,W] whose ``sampler`` yields whole
    batches of indices."""
    # its own generator: starting an epoch's iterator then draws nothing from the global random
    # stream, which a resumed run restores at the start of training (exact resume at epoch ends)
    return DataLoader(
        TensorDataset(images, labels),
        sampler=sampler,
        batch_size=None,
        num_workers=0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )
