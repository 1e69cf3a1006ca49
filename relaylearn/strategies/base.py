"""The one small interface every multi-site strategy implements.

A strategy owns its networks (it is an ``nn.Module``) and its training logic. The engine calls
its hooks in this order for every site of the relay::

    state_from_bundle(state)        # only when a bundle came in from the previous site
    on_site_start(site)
    for each epoch:  on_epoch_start(site, epoch)
        for each batch:  training_step(batch, step)
    on_site_end(site)
    state_to_bundle()               # everything the next site needs, nothing else

Optional hooks, declared here with defaults: ``generate_replay`` (strategies that rehearse earlier
sites from generators; :meth:`Strategy.replays` tells whether a class does) and ``previews``
(generated pairs for people to look at: TensorBoard, the report).

Everything that reaches the next site goes through ``state_to_bundle``: tensors (written to
safetensors) and JSON-able metadata. Nothing else crosses a site boundary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from relaylearn.config import Strict
from relaylearn.errors import ConfigError

#: the most sites a strategy's history (``sites_seen``) may name: a relay's largest site capacity
MAX_SITES_SEEN = 1024


class StrategyOptions(Strict):
    """Options of a strategy (``common.strategy.kwargs``). Unknown keys, non-finite numbers and
    booleans given for numbers are errors."""


@dataclass
class SiteContext:
    """What a strategy knows about the site being trained.

    ``train_images``: float tensor [N, C, H, W] in the configured ``out_range``;
    ``train_labels``: int64 tensor [N, H, W] of class ids. Both live in host memory.
    """

    name: str
    task_id: int
    position: int  # 0 for the first site this model ever trained on, 1 for the next, ...
    num_images: int  # unique training images of this site
    num_epochs: int
    steps_per_epoch: int
    train_images: Tensor
    train_labels: Tensor
    batch_size: int = 1
    budget_steps: int | None = None  # exact batch budget of the site (None: whole epochs)

    @property
    def total_steps(self) -> int:
        """Batches this site trains (the budget; the last epoch may be partial)."""
        return self.budget_steps if self.budget_steps is not None else self.num_epochs * self.steps_per_epoch


@dataclass
class StepContext:
    """Per-batch information and engine services given to ``training_step``."""

    step: int  # batch index within the site, 0-based
    global_step: int  # batches since the first site of the relay (carried in the bundle)
    epoch: int  # epoch within the site, 0-based
    site: SiteContext
    backward: Callable[[Tensor], None] = field(default=lambda loss: loss.backward())
    all_reduce_mean: Callable[[Tensor], Tensor] = field(default=lambda t: t)
    world_size: int = 1
    #: replace NaN/inf gradients before stepping (off under fp16 loss scaling, which needs the infs)
    sanitize: bool = True
    #: the bare optimizer behind the loop's wrapper, for work a strategy runs in a helper thread
    #: with a plain ``loss.backward()`` (the loop's hooks and counters are not thread-safe); None
    #: where every backward and step must go through the loop (several processes, fp16 loss scaling)
    unwrapped: Callable[[torch.optim.Optimizer], torch.optim.Optimizer] | None = field(default=lambda optimizer: optimizer)

    @property
    def progress(self) -> float:
        """Fraction of the site's training already done, in [0, 1)."""
        return (self.epoch * self.site.steps_per_epoch + self.step % max(1, self.site.steps_per_epoch)) / max(1, self.site.total_steps)


@dataclass
class BundleState:
    """What crosses the boundary: named tensors and JSON-able metadata."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]


class Strategy(nn.Module):
    """Base class. Subclasses set ``name``, ``Options`` and build their networks in ``__init__``.

    ``self.solver`` is the segmentation network used for testing, prediction and export:
    input [B, C, H, W] in ``out_range``, output logits [B, num_classes, H, W].
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: True for strategies that train on all sites' data at once (the joint baseline).
    pooled_training: ClassVar[bool] = False
    #: False for strategies whose batch leaves some trainable parameters without a gradient (the
    #: relay: its G, D and solver steps each train their own networks); with several processes the
    #: engine then runs Lightning's DDP with ``find_unused_parameters`` (plain DDP fails there).
    uses_every_parameter_each_step: ClassVar[bool] = True

    def __init__(self, options: StrategyOptions, solver: nn.Module, config: Any):
        """``options``: validated ``Options``; ``solver``: the segmentation network; ``config``:
        the site's resolved ``TaskConfig`` (``config.train``, ``config.dataset.kwargs``, ...)."""
        super().__init__()
        self.options = options
        self.solver = solver
        self.config = config
        self.train_cfg = config.train
        self.sites_seen: list[str] = []
        self.global_step = 0  # batches trained since the first site of the relay
        #: set by the engine from ``configure_optimizers`` before the first batch of a site
        self.optimizers: list[torch.optim.Optimizer] = []

    # ----- hooks ---------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """One Adam over the solver's trainable parameters, from ``train.optimizer`` (``fused``: the
        fused kernel, also on the CPU, where it is about 3x faster than the per-tensor loop)."""
        opt = self.train_cfg.optimizer
        params = [p for p in self.solver.parameters() if p.requires_grad]
        return [torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=opt.fused)]

    def on_site_start(self, site: SiteContext) -> None:
        """Called before the first batch of a site."""

    def on_epoch_start(self, site: SiteContext, epoch: int) -> None:
        """Called before every epoch of a site."""

    def training_step(self, batch: tuple[Tensor, Tensor], step: StepContext) -> dict[str, Tensor]:
        """Train on one batch (images [B,C,H,W], labels [B,H,W]); return scalars to log."""
        raise NotImplementedError

    def on_site_end(self, site: SiteContext) -> None:
        """Called after the last batch of a site, before testing and writing the bundle."""
        self.sites_seen.append(site.name)

    def check_sites(self, sites: list[str]) -> None:
        """Pre-flight: ConfigError unless this strategy, as it stands (fresh, or restored from the
        bundle a run starts from), can go on to train the sites named ``sites``, in that order.
        Default: any sites."""

    def site_summary(self) -> dict[str, float]:
        """Scalars about the site just finished (after ``on_site_end``), logged to TensorBoard as
        ``site/<key>``; empty by default."""
        return {}

    def state_to_bundle(self) -> BundleState:
        """Everything the next site needs. Default: the solver's weights and ``meta()``."""
        return BundleState(tensors=prefixed(self.solver.state_dict(), "solver."), meta=self.meta())

    def state_from_bundle(self, state: BundleState) -> None:
        """Restore what ``state_to_bundle`` wrote (strictly: every tensor must fit)."""
        self.solver.load_state_dict(unprefixed(state.tensors, "solver."), strict=True)
        self.load_meta(state.meta)

    def meta(self) -> dict[str, Any]:
        """JSON-able, non-tensor state (travels in the bundle manifest and local checkpoints)."""
        return {"sites_seen": list(self.sites_seen), "global_step": int(self.global_step)}

    def load_meta(self, meta: dict[str, Any]) -> None:
        """Read :meth:`meta` back (from a bundle or a checkpoint); ValueError for a value of the
        wrong type or range (a bundle that does not fit), never a silent coercion."""
        from relaylearn.bundle import HOP_SITE_PATTERN

        seen = meta.get("sites_seen", [])
        if not (isinstance(seen, list) and len(seen) <= MAX_SITES_SEEN and all(isinstance(n, str) and re.fullmatch(HOP_SITE_PATTERN, n) for n in seen)):
            raise ValueError(f"sites_seen: expected a list of at most {MAX_SITES_SEEN} site names")
        self.sites_seen = list(seen)
        self.global_step = meta_number(meta, "global_step", 0, integer=True)

    # local resume checkpoints carry meta() through nn.Module's extra state
    def get_extra_state(self) -> dict[str, Any]:
        return self.meta()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.load_meta(state)

    def forward(self, x: Tensor) -> Tensor:
        return self.solver(x)

    # ----- optional hooks (replaying strategies) -------------------------------------------
    @classmethod
    def replays(cls) -> bool:
        """True when the strategy rehearses earlier sites from generators (it overrides
        ``generate_replay``): replay fidelity, previews and the privacy audit apply."""
        return cls.generate_replay is not Strategy.generate_replay

    def generate_replay(self, site: int | str, n: int, seed: int = 0, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """``n`` generated pairs of an earlier ``site``: images [n, C, H, W] in ``out_range``,
        labels [n, H, W] class ids. Only for strategies that replay."""
        raise NotImplementedError(f"strategy '{self.name}' does not replay earlier sites")

    def previews(self, per_site: int = 8, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
        """Site → (images [n, C, H, W] in ``out_range``, labels [n, H, W]) generated for people to
        look at; empty for strategies without generators."""
        return {}

    def replay_sites(self) -> dict[str, int]:
        """Site name → id of every site :meth:`generate_replay` can make pairs of; the privacy audit
        after each hop walks these. Default: none (nothing to audit)."""
        return {}

    def discriminator_scorers(self, site_id: int) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        """For the privacy audit, when discriminators travel in the bundle: check name → function
        (images [N, C, H, W] in ``out_range``, labels [N, H, W]) → real/fake scores [N] for
        ``site_id``. Default: none."""
        return {}

    # ----- helpers for subclasses ----------------------------------------------------------
    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer, step: StepContext) -> Tensor | float:
        """zero_grad → backward (DDP-aware) → replace NaN/inf gradients → :meth:`adjust_gradients`
        → clip → optimizer step → :meth:`after_optimizer_step`. Returns the factor clipping scaled
        the gradients by (see :meth:`clip_gradients`); ``p.grad`` still holds the gradients the
        step used."""
        optimizer.zero_grad(set_to_none=True)
        step.backward(loss)
        return self.apply_gradients(optimizer, step)

    def apply_gradients(self, optimizer: torch.optim.Optimizer, step: StepContext) -> Tensor | float:
        """The end of :meth:`optimize`, once the gradients are in: replace NaN/inf gradients (not
        under ``16-mixed``, whose loss scaler must see them) → :meth:`adjust_gradients` → clip →
        optimizer step → :meth:`after_optimizer_step`. Returns the clipping factor."""
        if step.sanitize:
            sanitize_gradients(p for group in optimizer.param_groups for p in group["params"])
        self.adjust_gradients(optimizer, step)
        factor = self.clip_gradients(optimizer)
        step_optimizer(optimizer)
        self.after_optimizer_step(optimizer, step)
        return factor

    def adjust_gradients(self, optimizer: torch.optim.Optimizer, step: StepContext) -> None:
        """Hook: change ``optimizer``'s gradients in place before they are clipped and applied
        (OWM with ``projection: gradient`` projects them). Under ``16-mixed`` they are still loss-scaled here. Default: nothing."""

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer, step: StepContext) -> None:
        """Hook: called right after ``optimizer`` stepped (through the loop's wrapper: under
        ``16-mixed`` the loss scaler may have skipped the step, leaving the weights unchanged; under
        DDP every rank calls it after the same step). OWM projects the step's weight change here.
        Default: nothing."""

    def clip_gradients(self, optimizer: torch.optim.Optimizer) -> Tensor | float:
        """``train.gradient_clip`` > 0: scale the gradients of ``optimizer``'s parameters so their
        joint L2 norm is at most that value (each optimizer on its own, as Lightning's
        ``gradient_clip_val`` did in the original). 0: nothing.

        Returns the factor in (0, 1] the gradients were multiplied by (a 0-dim tensor, read
        without a device sync; 1.0 when nothing was clipped)."""
        max_norm = self.train_cfg.gradient_clip
        if max_norm <= 0:
            return 1.0
        total = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
        return (max_norm / (total + 1e-6)).clamp(max=1.0)  # the factor clip_grad_norm_ applied


def step_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, then forget autocast's casts of the weights it changed.

    With its cast cache on (``torch.autocast``'s default), autocast keeps the low-precision copy
    of every leaf weight it casts until the outermost autocast region ends; the optimizer updates
    the weights in place, so a forward after a step in the same region would see the old values.
    Lightning's ``bf16-mixed`` turns the cache off, but a strategy also runs under other loops
    (``benchmarks/speed.py``, a user's own) that may wrap several steps in one region."""
    optimizer.step()
    torch.clear_autocast_cache()


def meta_number(meta: dict[str, Any], key: str, default: float, *, integer: bool = False, minimum: float = 0) -> Any:
    """``meta[key]`` (``default`` when absent): a finite number (an int with ``integer``) of at
    least ``minimum``; ValueError otherwise (the string "nan", a bool, a float where an int belongs)."""
    value = meta.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{key}: expected {'an integer' if integer else 'a finite number'} ≥ {minimum}, got {value!r:.40}")
    return value


def sanitize_gradients(params) -> None:
    """Replace NaN gradients by 0 and ±inf by ±1e5 in place, without a host sync."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def parse_options(
    cls: type[Strategy], kwargs: dict[str, Any] | None, where: str = "common.strategy.kwargs", path: str | Path | None = None, sets: dict | None = None
) -> StrategyOptions:
    """Validate a strategy's kwargs; an unknown key or wrong type is a ConfigError naming it and
    the config file ``path`` or, for a key a ``--set`` item wrote (``sets``, as
    :attr:`relaylearn.config.RunConfig.sets`), that item."""
    from relaylearn.config import validate_section

    try:
        return validate_section(cls.Options, kwargs or {}, where, path, sets=sets, base=("strategy", "kwargs"))
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (strategy '{cls.name}')", exc.path) from None
