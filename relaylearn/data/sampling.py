"""Batches of an in-memory site: a seeded, resumable batch sampler (DDP-aware) and its loader."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset


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

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.cat([torch.randperm(self.num_items, generator=g) for _ in range(self.num_replica)])
        batches = list(order.split(self.batch_size))
        if len(batches) > self.total_batches:  # fold a lone last item into the batch before it
            batches[-2:] = [torch.cat(batches[-2:])]
        start, self.skip = self.skip, 0
        for i in range(start, len(self)):
            yield batches[i * self.world_size + self.rank].tolist() if self.world_size > 1 else batches[i].tolist()


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
