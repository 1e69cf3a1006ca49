"""SiteBatchSampler: the order of a seed and epoch, DDP shares, resume, lazy draws."""

from __future__ import annotations

import pytest
import torch

from relaylearn.data import sampling
from relaylearn.data.sampling import SiteBatchSampler
from relaylearn.errors import DataError


def reference_batches(num_items: int, batch_size: int, num_replica: int, seed: int, epoch: int, fold: bool) -> list[list[int]]:
    """The order as first written: every copy drawn at once, split, a lone last item folded into the batch before it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.cat([torch.randperm(num_items, generator=g) for _ in range(num_replica)])
    batches = list(order.split(batch_size))
    if fold and len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return [b.tolist() for b in batches]


SIZES = [(7, 3, 1), (7, 3, 2), (5, 4, 1), (16, 4, 3), (9, 2, 5), (1, 4, 1)]


@pytest.mark.parametrize("num_items, batch_size, num_replica", SIZES)
def test_the_order_of_a_seed_and_epoch_is_unchanged(num_items, batch_size, num_replica):
    sampler = SiteBatchSampler(num_items, batch_size, num_replica, seed=5)
    for epoch in (0, 3):
        sampler.set_epoch(epoch)
        assert list(sampler) == reference_batches(num_items, batch_size, num_replica, 5, epoch, fold=True)
    sampler.resume(3, 1)
    assert list(sampler) == reference_batches(num_items, batch_size, num_replica, 5, 3, fold=True)[1:]


@pytest.mark.parametrize("num_items, batch_size, num_replica", [s for s in SIZES if s[0] * s[2] > s[1]])
def test_each_ddp_rank_takes_every_other_batch(num_items, batch_size, num_replica):
    expected = reference_batches(num_items, batch_size, num_replica, 5, 0, fold=False)
    steps = len(expected) // 2
    for rank in (0, 1):
        assert list(SiteBatchSampler(num_items, batch_size, num_replica, seed=5, rank=rank, world_size=2)) == expected[rank::2][:steps]


def test_copies_are_drawn_as_the_batches_are_taken(monkeypatch):
    """Every copy was drawn before the first batch: num_replica 1e9 exhausted the memory."""
    drawn = []
    randperm = torch.randperm
    monkeypatch.setattr(sampling.torch, "randperm", lambda n, **kw: drawn.append(n) or randperm(n, **kw))
    first = next(iter(SiteBatchSampler(10, 4, num_replica=10_000, seed=1)))
    assert len(first) == 4 and len(drawn) == 1


def test_fewer_batches_than_processes_is_a_data_error():
    """Rank 1 of 2 had no batch (IndexError, or a hang while rank 0 waited for it)."""
    with pytest.raises(DataError, match="2 training draws make 1 batch\\(es\\) of 4, fewer than the 2 processes"):
        list(SiteBatchSampler(2, 4, rank=1, world_size=2))
