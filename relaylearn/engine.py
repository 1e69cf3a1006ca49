"""Where a strategy runs: Lightning 2.x drives one site's training (devices, precision, DDP,
checkpoints for resume); this module adapts a ``Strategy`` to it and evaluates the solver."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    sampler = SiteBatchSampler(len(images), batch_size, num_replica, seed, rank, world_size)
    # its own generator: starting an epoch's iterator then draws nothing from the global random
    # stream, which a resumed run restores at the start of training (exact resume at epoch ends)
    return DataLoader(TensorDataset(images, labels), sampler=sampler, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed))


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


def prepare_networks(strategy: Strategy, train_cfg) -> None:
    """Before a site starts (so the copies a strategy makes at site start inherit it): with
    ``train.channels_last`` every network of the strategy (the solver, and the relay's generators
    and discriminators) keeps its 4-D weights in ``channels_last`` memory format; with
    ``train.compile`` the solver is compiled in place (``nn.Module.compile``: same state-dict names)."""
    if train_cfg.channels_last:
        strategy.to(memory_format=torch.channels_last)
    if train_cfg.compile:
        strategy.solver.compile()


# ----- the Lightning adapter ---------------------------------------------------------------------
class SiteModule(L.LightningModule):
    """Runs one site of a strategy under Lightning (manual optimisation, any number of optimisers)."""

    def __init__(self, strategy: Strategy, site: SiteContext, augment: torch.nn.Module | None = None, log_every: int = 10, channels_last: bool = False, max_batches: int | None = None, sampler: SiteBatchSampler | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.strategy = strategy
        self.site = site
        self.augment = augment
        self.log_every = log_every
        self.channels_last = channels_last
        #: the site's budget in batches (``train.num_steps`` need not fill whole epochs)
        self.max_batches = max_batches if max_batches is not None else site.total_steps
        self.start_global_step = strategy.global_step
        self.site_sampler = sampler  # told where to continue when resuming from a local checkpoint
        self.resumed_at = 0  # batches of this site already trained when it resumed from a local checkpoint
        self._rng_to_restore: dict | None = None
        self._site_started = False

    def setup(self, stage: str) -> None:
        prepare_networks(self.strategy, self.strategy.train_cfg)  # before on_site_start: copies inherit it
        if not self._site_started:
            self.strategy.on_site_start(self.site)
            self._site_started = True

    def configure_optimizers(self):
        return self.strategy.configure_optimizers()

    # local resume checkpoints (never shipped): where the site stood, and the random state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        position = {"batches_done": self._local_step() + 1}
        if self.trainer.world_size == 1:  # each DDP rank has its own stream; only rank 0's would be saved
            position["rng_torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                position["rng_cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["relaylearn_site"] = position

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        position = checkpoint.get("relaylearn_site", {})
        self.resumed_at = int(position.get("batches_done", 0))
        self._rng_to_restore = {k: v for k, v in position.items() if k.startswith("rng_")} or None
        if self.site_sampler is not None and self.resumed_at:
            # Lightning restores the loop counters but restarts a plain dataloader at the epoch's start
            self.site_sampler.resume(*divmod(self.resumed_at, self.site.steps_per_epoch))

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:  # the same random stream as an uninterrupted run
            torch.set_rng_state(self._rng_to_restore["rng_torch"])
            if "rng_cuda" in self._rng_to_restore and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self._rng_to_restore["rng_cuda"])
            self._rng_to_restore = None
        # Lightning's wrappers: their step() goes through the precision plugin (loss scaling)
        opts = self.optimizers()
        self.strategy.optimizers = list(opts) if isinstance(opts, (list, tuple)) else [opts]

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
            sanitize=self.trainer.precision != "16-mixed",
        )
        logs = self.strategy.training_step((images, labels), ctx)
        self.strategy.global_step = ctx.global_step + 1
        if logs and local_step % self.log_every == 0:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=images.shape[0], rank_zero_only=True)
        self._last_logs = logs

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # The site's budget is counted in batches here: Lightning's max_steps counts optimizer steps,
        # several per batch for strategies with several optimizers (relay: G, D and the solver).
        if self._local_step() + 1 >= self.max_batches:
            self.trainer.should_stop = True

    def _local_step(self) -> int:
        return self.current_epoch * self.site.steps_per_epoch + self.trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1

    def _all_reduce_mean(self, t: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="mean")

    def on_train_end(self) -> None:
        self.strategy.on_site_end(self.site)
        self._log_previews()

    def _log_previews(self, per_site: int = 8) -> None:
        """TensorBoard: generated image/label pairs per site, for strategies that replay."""
        previews = getattr(self.strategy, "previews", None)
        logger = self.logger
        if not callable(previews) or logger is None or not self.trainer.is_global_zero:
            return
        tb = getattr(logger, "experiment", None)
        if tb is None or not hasattr(tb, "add_images"):
            return
        lo, hi = self.site.train_images.min().item(), self.site.train_images.max().item()
        for site, (images, labels) in previews(per_site).items():
            tb.add_images(f"replay/{site}/images", ((images - lo) / max(hi - lo, 1e-6)).clamp(0, 1), self.strategy.global_step)
            tb.add_images(f"replay/{site}/labels", labels.unsqueeze(1).float() / max(1, getattr(self.strategy, "num_classes", 2) - 1), self.strategy.global_step)
        tb.flush()


class SiteProgressBar(Callback):
    """One bar per site over all its batches, with ETA and the latest loss."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        if trainer.is_global_zero:
            done = pl_module._local_step() + 1 if trainer.fit_loop.epoch_loop.batch_progress.current.ready else 0
            self.bar = tqdm(total=pl_module.max_batches, initial=max(0, done), desc=self.label, unit="batch", dynamic_ncols=True, leave=True)

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
        self._save_at_epoch_end = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module._local_step() + 1
        if step % self.every == 0 and step < pl_module.max_batches:
            if step % pl_module.site.steps_per_epoch == 0:
                # an epoch's last batch: Lightning resumes cleanly only from the epoch-end hook
                self._save_at_epoch_end = True
            else:
                self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
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
        chunk = chunk.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        outs.append(solver(chunk).float().cpu())
    solver.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_site(solver: torch.nn.Module, data, num_classes: int, batch_size: int = 64, device: Any = "cpu", bootstrap: int = 5000) -> dict:
    """Per-image and summary segmentation metrics of ``solver`` on one site's test data."""
    from relaylearn.metrics import SegmentationScores

    scores = SegmentationScores(num_classes=num_classes, n_bootstrap=bootstrap)
    logits = predict_logits(solver, data.images, batch_size, device)
    scores.update(logits.argmax(1), data.labels, data.names)
    return scores.compute()
