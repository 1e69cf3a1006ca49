"""Where a strategy runs: everything Lightning 2.x touches. :func:`fit_site` trains one site
(devices, precision, DDP, checkpoints for resume, TensorBoard) by adapting a ``Strategy`` to a
LightningModule; :func:`evaluate_site` scores the solver."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from relaylearn.data.sampling import SiteBatchSampler, site_loader
from relaylearn.models import in_eval_mode
from relaylearn.strategies.base import SiteContext, StepContext, Strategy


# ----- budgets -------------------------------------------------------------------------------------
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
    ``train.channels_last`` the relay's generators and discriminators keep their 4-D weights in
    ``channels_last`` memory format (their activations follow their weights: the generators start
    from a learnt constant), while the solver keeps its weights in the default layout and runs in
    ``channels_last`` because its input does (the engine converts every batch). Solver weights in
    ``channels_last`` buy nothing (oneDNN reorders weights for every convolution either way) and
    cost a copy of every 4-D weight, gradient and Adam state in each fused Adam step on the CPU.
    With ``train.compile`` the solver is compiled in place (``nn.Module.compile``: same state-dict names)."""
    if train_cfg.channels_last:
        strategy.to(memory_format=torch.channels_last)
        strategy.solver.to(memory_format=torch.contiguous_format)
    if train_cfg.compile:
        strategy.solver.compile()


# ----- the Lightning adapter ---------------------------------------------------------------------
class SiteModule(L.LightningModule):
    """Runs one site of a strategy under Lightning (manual optimisation, any number of optimisers)."""

    def __init__(
        self,
        strategy: Strategy,
        site: SiteContext,
        augment: torch.nn.Module | None = None,
        log_every: int = 10,
        channels_last: bool = False,
        max_batches: int | None = None,
        sampler: SiteBatchSampler | None = None,
    ):
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
        self._rank_to_restore: dict | None = None  # on resume: this rank's saved random state and strategy state
        self._site_started = False
        self.last_logs: dict[str, Tensor] = {}  # scalars of the latest batch (the progress bar shows the loss)

    def setup(self, stage: str) -> None:
        prepare_networks(self.strategy, self.strategy.train_cfg)  # before on_site_start: copies inherit it
        if not self._site_started:
            self.strategy.on_site_start(self.site)
            self._site_started = True

    def configure_optimizers(self):
        return self.strategy.configure_optimizers()

    # local resume checkpoints (never shipped): where the site stood, and every rank's random state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["relaylearn_site"] = {"batches_done": self._local_step() + 1, "ranks": self._per_rank_states()}

    def _per_rank_states(self) -> list[dict]:
        """Per rank (all ranks call it together): its random streams and, with several processes,
        its strategy state besides the parameters (buffers and extra state: DDP keeps only the
        parameters equal; the file's modules are rank 0's)."""
        mine: dict[str, Any] = {"rng_torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mine["rng_cuda"] = torch.cuda.get_rng_state_all()
        world = self.trainer.world_size
        if world == 1:
            return [mine]
        params = {name for name, _ in self.strategy.named_parameters(remove_duplicate=False)}
        mine["state"] = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.strategy.state_dict().items() if k not in params}
        ranks: list[Any] = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
        return ranks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        position = checkpoint.get("relaylearn_site", {})
        self.resumed_at = int(position.get("batches_done", 0))
        ranks = position.get("ranks") or [{k: v for k, v in position.items() if k.startswith("rng_")}]  # older: rank 0's stream only
        rank = self.trainer.global_rank
        self._rank_to_restore = ranks[rank] if rank < len(ranks) and ranks[rank] else None
        if self.site_sampler is not None and self.resumed_at:
            # Lightning restores the loop counters but restarts a plain dataloader at the epoch's start
            self.site_sampler.resume(*divmod(self.resumed_at, self.site.steps_per_epoch))

    def _restore_rank_state(self) -> None:
        """On resume: this rank's random streams and state as an uninterrupted run has them (after
        Lightning loaded the file's, rank 0's, modules)."""
        saved, self._rank_to_restore = self._rank_to_restore, None
        if saved is None:
            return
        if "state" in saved:
            self.strategy.load_state_dict(saved["state"], strict=False)
        torch.set_rng_state(saved["rng_torch"])
        if "rng_cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])

    def on_train_start(self) -> None:
        self._restore_rank_state()
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
            unwrapped=_bare_optimizer if self.trainer.world_size == 1 and self.trainer.precision != "16-mixed" else None,
        )
        logs = self.strategy.training_step((images, labels), ctx)
        self.strategy.global_step = ctx.global_step + 1
        if logs and local_step % self.log_every == 0:
            self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, prog_bar=False, batch_size=images.shape[0], rank_zero_only=True)
        self.last_logs = logs or {}

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
        self._log_site_summary()
        self._log_previews()

    def _tensorboard(self):
        """The TensorBoard writer on rank 0, or None."""
        tb = getattr(self.logger, "experiment", None) if self.logger is not None and self.trainer.is_global_zero else None
        return tb if tb is not None and hasattr(tb, "add_scalar") else None

    def _log_site_summary(self) -> None:
        """TensorBoard: the strategy's scalars about the finished site, as ``site/<key>``."""
        tb = self._tensorboard()
        summary = self.strategy.site_summary()
        if tb is None or not summary:
            return
        for key, value in summary.items():
            tb.add_scalar(f"site/{key}", value, self.strategy.global_step)
        tb.flush()

    def _log_previews(self, per_site: int = 8) -> None:
        """TensorBoard: generated image/label pairs per site, for strategies that replay."""
        tb = self._tensorboard()
        if not self.strategy.replays() or tb is None or not hasattr(tb, "add_images"):
            return
        lo, hi = self.site.train_images.min().item(), self.site.train_images.max().item()
        num_classes = self.strategy.config.dataset.kwargs.num_classes
        for site, (images, labels) in self.strategy.previews(per_site).items():
            tb.add_images(f"replay/{site}/images", ((images - lo) / max(hi - lo, 1e-6)).clamp(0, 1), self.strategy.global_step)
            tb.add_images(f"replay/{site}/labels", labels.unsqueeze(1).float() / max(1, num_classes - 1), self.strategy.global_step)
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
            in_a_log = not sys.stderr.isatty()  # a long run's log still shows progress, one frame per 30 s
            self.bar = tqdm(
                total=pl_module.max_batches,
                initial=max(0, done),
                desc=self.label,
                unit="batch",
                dynamic_ncols=True,
                leave=True,
                mininterval=30 if in_a_log else 0.1,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(1)
            logs = pl_module.last_logs
            if "loss" in logs and self.bar.n % 5 == 0:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", epoch=pl_module.current_epoch + 1)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _bare_optimizer(optimizer):
    """The torch optimizer behind Lightning's ``LightningOptimizer`` (whose ``step`` runs the
    trainer's hooks and counters)."""
    return getattr(optimizer, "optimizer", optimizer)


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


# ----- one site ----------------------------------------------------------------------------------
def is_main_process() -> bool:
    """False in the worker ranks (> 0) of a multi-process (DDP) run; Lightning sets the rank from
    the launch environment at import and from the Trainer once one exists."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def quiet_lightning() -> None:
    """Lightning's start-up chatter (GPU/TPU lines, tips) is noise for our users."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message=r".*(does not have many workers|smaller than the logging interval|LeafSpec|litlogger|module\(s\) in eval mode|dataloader is not resumable).*",
    )
    # DDP: the solver's 1x1 convolutions keep their weights in the default layout and get
    # channels_last-strided gradients from channels_last inputs; for a 1x1 kernel both strides
    # order the elements the same, so the reducer's warning is noise (another kernel's still shows)
    warnings.filterwarnings("ignore", message=r"(?s)Grad strides do not match bucket view strides.*grad\.sizes\(\) = \[\d+, \d+, 1, 1\]")


def lightning_strategy(name: str, strategy: Strategy, world_size: int) -> str:
    """The Lightning strategy for ``train.lightning.strategy`` ``name``: where DDP runs (``ddp``,
    or ``auto`` with several processes) for a strategy whose batch leaves parameters unused
    (``uses_every_parameter_each_step`` False), ``ddp_find_unused_parameters_true`` (plain DDP
    stops at the first batch there); else ``name`` unchanged."""
    runs_ddp = name == "ddp" or (name == "auto" and world_size > 1)
    if runs_ddp and not strategy.uses_every_parameter_each_step:
        return "ddp_find_unused_parameters_true"
    return name


def seed_site(seed: int) -> None:
    """Seed every random stream (torch, numpy, python, loader workers) before a site starts."""
    L.seed_everything(seed, workers=True, verbose=False)


@dataclass
class SiteFit:
    """What training one site leaves besides the trained strategy."""

    device: torch.device  # where the strategy's networks are
    tensorboard: Any | None  # rank 0's SummaryWriter (None in other ranks)
    barrier: Callable[[], None]  # DDP: wait for every rank (no-op in one process)
    resumed_at: int  # batches already trained when resumed from a local checkpoint (0: fresh)


def real_data_augmentation(kwargs):
    """The augmentation of real training images that ``dataset.kwargs.augment`` asks for (None for
    none); ConfigError for a bad spec."""
    if kwargs.augment in (None, "none"):
        return None
    from relaylearn.data.augment import from_config

    return from_config(kwargs.augment, tuple(kwargs.out_range))


def require_training_images(count: int, task, site_name: str) -> None:
    """DataError unless a site has the 2 training images BatchNorm needs (after the validation
    hold-out); ``task``: its config (``dataset.kwargs.val_fraction`` goes into the message)."""
    from relaylearn.errors import DataError

    if count < 2:
        raise DataError(
            f"site '{site_name}' has {count} training image(s) after the validation hold-out "
            f"(dataset.kwargs.val_fraction {task.dataset.kwargs.val_fraction}); training needs at least 2"
        )


@contextlib.contextmanager
def _stops_as_interrupted(trainer, site_name: str):
    """Ctrl-C and SIGTERM inside ``trainer.fit`` as :class:`Interrupted` (exit 130 / 143, one line
    saying how to continue). Lightning turns Ctrl-C into ``sys.exit(1)`` and SIGTERM into a
    ``SystemExit`` without a code (exit 0: a wrapper script would take the hop as done), and
    leaves Ctrl-C ignored for the rest of the process."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from relaylearn.errors import Interrupted

    hint = f"while site {site_name} trained; its last checkpoint is kept"
    try:
        yield
        if trainer.received_sigterm:  # it came after the last batch, in the site's closing work: Lightning only noted it
            raise SIGTERMException
    except SIGTERMException:
        raise Interrupted(f"terminated (SIGTERM) {hint}", exit_code=143) from None
    except SystemExit:
        if not trainer.interrupted:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise Interrupted(f"interrupted (Ctrl-C) {hint}") from None


def fit_site(
    strategy: Strategy,
    images: Tensor,
    labels: Tensor,
    task,
    *,
    site_name: str,
    seed: int,
    run_dir: Path,
    checkpoint_dir: Path,
    devices: str | None = None,
    resume: bool = False,
    progress: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> SiteFit:
    """Train ``strategy`` on one site's images [N, C, H, W] and labels [N, H, W] for ``task.train``'s
    budget, under Lightning on ``devices`` (``-g``). ``checkpoint_dir/last.ckpt`` is the local resume
    point (used with ``resume``); ``progress``: the label of a progress bar (None: no bar)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from relaylearn.devices import keep_freed_host_memory, parse_devices, resolve_precision

    train, k = task.train, task.dataset.kwargs
    require_training_images(len(images), task, site_name)
    accelerator, devs = parse_devices(devices, train.lightning)
    if accelerator == "cpu":
        keep_freed_host_memory()
    world = (len(devs) if isinstance(devs, list) else int(devs)) * train.lightning.num_nodes
    epochs, total = epochs_for_budget(train, len(images), k.num_replica, train.batch_size, world)
    loader = site_loader(images, labels, train.batch_size, k.num_replica, seed, world_size=world)
    if k.neg_pos_ratio:  # k negatives per positive slice, re-drawn every epoch
        from relaylearn.data.ct import neg_pos_loader

        loader = neg_pos_loader(images, labels, k, train.batch_size, seed, world_size=world, where=site_name)
        epochs, total = epochs_for_budget(train, loader.sampler.num_items, k.num_replica, train.batch_size, world)
    site = SiteContext(
        name=site_name,
        task_id=k.task_id,
        position=len(strategy.sites_seen),
        num_images=len(images),
        num_epochs=epochs,
        steps_per_epoch=len(loader.sampler),
        train_images=images,
        train_labels=labels,
        batch_size=train.batch_size,
        budget_steps=total,
    )
    augment = real_data_augmentation(k)
    module = SiteModule(
        strategy, site, augment=augment, log_every=train.log_every_n_steps, channels_last=train.channels_last, max_batches=total, sampler=loader.sampler
    )
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ckpt = LocalCheckpoint(checkpoint_dir / "last.ckpt", train.checkpoint_every_n_steps)
    callbacks: list[Callback] = [ckpt] + ([SiteProgressBar(progress)] if progress is not None else [])
    precision = resolve_precision(train.precision, accelerator)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devs,
        num_nodes=train.lightning.num_nodes,
        strategy=lightning_strategy(train.lightning.strategy, strategy, world),  # on the CPU Lightning picks gloo for ddp
        precision=precision,
        max_epochs=epochs,
        max_steps=-1,
        logger=TensorBoardLogger(run_dir, name="tensorboard", version=f"task_{k.task_id}"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
        gradient_clip_val=None,
        log_every_n_steps=train.log_every_n_steps,
        default_root_dir=run_dir,
    )
    # the rank is known once the Trainer exists (it reads the launch environment)
    loader.sampler.rank, loader.sampler.world_size = trainer.global_rank, trainer.world_size
    if trainer.global_rank > 0:  # DDP: weights start equal (rank 0's are broadcast); latents, replay and augmentation differ per rank
        torch.manual_seed(seed + 1_000_003 * trainer.global_rank)
    resume_from = ckpt.path if (resume and ckpt.path.is_file()) else None
    if resume_from:
        log(f"[{site_name}] resuming from {resume_from}")
    with _stops_as_interrupted(trainer, site_name):
        trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_from, weights_only=False)  # local-only checkpoint
    if resume_from:
        log(f"[{site_name}] resumed at batch {module.resumed_at} of {total}")
    return SiteFit(
        device=module.device,
        tensorboard=trainer.logger.experiment if trainer.is_global_zero else None,
        barrier=trainer.strategy.barrier,
        resumed_at=module.resumed_at,
    )


# ----- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(solver: torch.nn.Module, images: Tensor, batch_size: int = 64, device: torch.device | str = "cpu") -> Tensor:
    """Logits [N, K, H, W] (on the CPU) of ``solver`` on images [N, C, H, W], in eval mode."""
    outs = []
    with in_eval_mode(solver):
        for chunk in images.split(batch_size):
            chunk = chunk.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            outs.append(solver(chunk).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_site(
    solver: torch.nn.Module, data, num_classes: int, batch_size: int = 64, device: Any = "cpu", bootstrap: int = 5000, first_class: int = 1
) -> dict:
    """Per-image and summary segmentation metrics (:class:`~relaylearn.metrics.SegmentationScores`
    of the classes ``first_class``..K−1, bootstrapped over ``data.subjects``) of ``solver`` on one
    site's test data, whose labels have ``num_classes`` classes: UserError when the solver predicts
    another number (a class it cannot predict would count as a perfect Dice wherever it is absent)."""
    from relaylearn.errors import UserError
    from relaylearn.metrics import SegmentationScores

    scores = SegmentationScores(num_classes=num_classes, n_bootstrap=bootstrap, first_class=first_class)
    logits = predict_logits(solver, data.images, batch_size, device)
    if logits.numel() and logits.shape[1] != num_classes:
        raise UserError(f"the test data has {num_classes} classes but the model predicts {logits.shape[1]}")
    scores.update(logits.argmax(1), data.labels, data.names, getattr(data, "subjects", None))  # none: each image is its own subject
    return scores.compute()
