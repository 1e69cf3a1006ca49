"""Where a strategy runs: Lightning 2.x drives one site's training (devices, precision, DDP,
checkpoints for resume); this module adapts a ``Strategy`` to it and evaluates the solver."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from relaylearn.strategies.base import SiteContext, StepContext, Strategy


# ----- data --------------------------------------------------------------------------------------
class SiteBatchSampler(Sampler[list[int]]):
    """Yields index batches over ``num_items × num_replica`` draws, reshuffled every epoch.

    Deterministic given (seed, epoch). Under DDP every rank draws the same permutation and
    takes every ``world_size``-th batch, so ranks see disjoint data and the same batch count.
    """

    def __init__(self, num_items: int, batch_size: int, num_replica: int = 1, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.num_replica = num_items, batch_size, num_replica
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def total_batches(self) -> int:
        return math.ceil(self.num_items * self.num_replica / self.batch_size)

    def __len__(self) -> int:
        return self.total_batches if self.world_size == 1 else max(1, self.total_batches // self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.cat([torch.randperm(self.num_items, generator=g) for _ in range(self.num_replica)])
        batches = order.split(self.batch_size)
        for i in range(len(self)):
            yield batches[i * self.world_size + self.rank].tolist() if self.world_size > 1 else batches[i].tolist()


def site_loader(images: Tensor, labels: Tensor, batch_size: int, num_replica: int, seed: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A loader over an in-memory site: images [N,C,H,W], labels [N,H,W]; each item is a batch."""
    sampler = SiteBatchSampler(len(images), batch_size, num_replica, seed, rank, world_size)
    return DataLoader(TensorDataset(images, labels), sampler=sampler, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())


def steps_per_epoch(num_items: int, batch_size: int, num_replica: int, world_size: int = 1) -> int:
    return len(SiteBatchSampler(num_items, batch_size, num_replica, world_size=world_size))


def epochs_for_budget(train_cfg, num_items: int, num_replica: int, batch_size: int, world_size: int = 1) -> tuple[int, int]:
    """(epochs, total steps) of a site from ``num_epochs`` / ``num_mimgs`` / ``num_steps``.

    ``num_mimgs`` follows the original: ``floor(num_mimgs·1e6 / (N·num_replica)) + 1`` epochs.
    """
    per_epoch = steps_per_epoch(num_items, batch_size, num_replica, world_size)
    if train_cfg.num_steps is not None:
        epochs = math.ceil(train_cfg.num_steps / per_epoch)
        return epochs, train_cfg.num_steps
    if train_cfg.num_mimgs is not None:
        epochs = int(train_cfg.num_mimgs * 1e6 // (num_items * num_replica)) + 1
    else:
        epochs = train_cfg.num_epochs
    return epochs, epochs * per_epoch


# ----- the Lightning adapter ---------------------------------------------------------------------
class SiteModule(L.LightningModule):
    """Runs one site of a strategy under Lightning (manual optimisation, any number of optimisers)."""

    def __init__(self, strategy: Strategy, site: SiteContext, augment: torch.nn.Module | None = None, log_every: int = 10, channels_last: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.strategy = strategy
        self.site = site
        self.augment = augment
        self.log_every = log_every
        self.channels_last = channels_last
        self.start_global_step = strategy.global_step
        self._site_started = False

    def setup(self, stage: str) -> None:
        if not self._site_started:
            self.strategy.on_site_start(self.site)
            self._site_started = True
        if self.channels_last:
            self.strategy.to(memory_format=torch.channels_last)

    def configure_optimizers(self):
        return self.strategy.configure_optimizers()

    def on_train_start(self) -> None:
        opts = self.optimizers()
        self.strategy.optimizers = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        self.strategy.optimizers = [getattr(o, "optimizer", o) for o in self.strategy.optimizers]
        self._wrapped_optimizers = opts if isinstance(opts, (list, tuple)) else [opts]

    def on_train_epoch_start(self) -> None:
        self.strategy.on_epoch_start(self.site, self.current_epoch)

    def training_step(self, batch, batch_idx: int):
        images, labels = batch
        if self.augment is not None:
            images, labels = self.augment(images, labels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        local_step = self._local_step()
        ctx = StepContext(
            step=local_step,
            global_step=self.start_global_step + local_step,
            epoch=self.current_epoch,
            site=self.site,
            backward=self.manual_backward,
            all_reduce_mean=self._all_reduce_mean,
            world_size=self.trainer.world_size,
        )
        logs = self.strategy.training_step((images, labels), ctx)
        self.strategy.global_step = ctx.global_step + 1
        if logs and local_step % self.log_every == 0:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=images.shape[0], rank_zero_only=True)
        self._last_logs = logs

    def _local_step(self) -> int:
        return self.current_epoch * self.site.steps_per_epoch + self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1

    def _all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="mean")

    def on_train_end(self) -> None:
        self.strategy.on_site_end(self.site)


class SiteProgressBar(Callback):
    """One bar per site over all its batches, with ETA and the latest loss."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        if trainer.is_global_zero:
            site = pl_module.site
            done = pl_module._local_step() + 1 if trainer.fit_loop.epoch_loop.batch_progress.current.ready else 0
            self.bar = tqdm(total=site.total_steps, initial=max(0, done), desc=self.label, unit="batch", dynamic_ncols=True, leave=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(1)
            logs = getattr(pl_module, "_last_logs", None) or {}
            if "loss" in logs and self.bar.n % 5 == 0:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", epoch=pl_module.current_epoch + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LocalCheckpoint(Callback):
    """Writes ``last.ckpt`` every N batches for ``--resume`` (kept at the site, never shipped).

    Written to a temporary name and renamed, so a kill mid-write never corrupts it.
    """

    def __init__(self, path: Path, every_n_steps: int):
        self.path = Path(path)
        self.every = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module._local_step() + 1
        if step % self.every == 0 and step < pl_module.site.total_steps:
            self.save(trainer)

    def save(self, trainer) -> None:
        tmp = self.path.with_suffix(".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier()


# ----- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(solver: torch.nn.Module, images: Tensor, batch_size: int = 64, device: torch.device | str = "cpu") -> Tensor:
    """Logits [N, K, H, W] (on the CPU) of ``solver`` on images [N, C, H, W], in eval mode."""
    was_training = solver.training
    solver.eval()
    outs = []
    for chunk in images.split(batch_size):
        outs.append(solver(chunk.to(device, non_blocking=True)).float().cpu())
    solver.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_site(solver: torch.nn.Module, data, num_classes: int, batch_size: int = 64, device: Any = "cpu", bootstrap: int = 5000) -> dict:
    """Per-image and summary segmentation metrics of ``solver`` on one site's test data."""
    from relaylearn.metrics import SegmentationScores

    scores = SegmentationScores(num_classes=num_classes, n_bootstrap=bootstrap)
    logits = predict_logits(solver, data.images, batch_size, device)
    scores.update(logits.argmax(1), data.labels, data.names)
    return scores.compute()
