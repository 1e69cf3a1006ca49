"""Assembling what a command works with: a site's data split, a strategy built from a config or
restored from a bundle (one route for both), any bundle read for local use. Nothing named by a
bundle is imported: plug-ins resolve only when the local config names them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from relaylearn.config import DatasetConfig, RunConfig, TaskConfig
from relaylearn.data.layouts import Layout, get_layout
from relaylearn.errors import ConfigError, DataError, RelayError, UserError, VerificationError
from relaylearn.plugins import is_plugin
from relaylearn.strategies import get_strategy_class
from relaylearn.strategies.base import BundleState, Strategy, parse_options


def load_split(ds: DatasetConfig, split: str):
    """Pre-decode one site's split into memory (images [N,C,H,W], labels [N,H,W]).

    ``"train"`` and ``"val"`` are the two parts of the site's ``train`` folder
    (:func:`relaylearn.data.split.validation_split`, study-wise by ``subjects``); ``"test"`` is the
    ``test`` folder."""
    if split not in ("train", "val"):
        return _read_folder(ds, split)
    data, parts = load_training_folder(ds)
    return data if parts is None else part_of(data, parts[0] if split == "train" else parts[1])


def first_scored_class(ds: DatasetConfig) -> int:
    """The lowest class id the metrics score on ``ds``'s data (its layout's
    :meth:`~relaylearn.data.layouts.Layout.first_scored_class`)."""
    return get_layout(ds.name).first_scored_class(ds.kwargs)


def load_training_folder(ds: DatasetConfig):
    """The site's ``train`` folder, decoded, and the indices (training part, validation part) of
    its items; None instead of the indices when ``val_fraction`` is 0 (everything trains)."""
    from relaylearn.data.split import validation_split

    data = _read_folder(ds, "train")
    k = ds.kwargs
    if k.val_fraction == 0:
        return data, None
    try:
        return data, validation_split(len(data), k.val_fraction, k.val_seed, groups=data.subjects)
    except DataError as exc:
        raise DataError(f"site {ds.site}: {exc.message}") from None


def _read_folder(ds: DatasetConfig, split: str):
    k = ds.kwargs
    folders = k.img_folder if k.img_folder is not None else ds.site
    return get_layout(ds.name).load(ds.root, folders, split, k, site_name=ds.site)


def part_of(data, keep: list[int]):
    """The items ``keep`` (indices) of a decoded split."""
    index = torch.as_tensor(keep, dtype=torch.long)
    return replace(
        data,
        images=data.images[index],
        labels=data.labels[index],
        names=[data.names[i] for i in keep],
        subjects=[data.subjects[i] for i in keep],
        sources=[data.sources[i] for i in keep],
    )


def shipped_config(task: TaskConfig) -> dict[str, Any]:
    """The config that travels in a bundle: everything but local paths and checkpoint plumbing."""
    cfg = task.model_dump(mode="json")
    cfg.pop("checkpoint", None)
    cfg["dataset"]["kwargs"].pop("root_path", None)
    cfg["dataset"]["kwargs"].pop("img_folder", None)
    if cfg["model"]["kwargs"].get("pretrained_path"):
        cfg["model"]["kwargs"]["pretrained_path"] = None
    return cfg


def build_task_solver(task: TaskConfig, load_pretrained: bool) -> nn.Module:
    """A fresh solver of ``task``'s ``model`` block for its dataset's channels and classes."""
    from relaylearn.models import build_solver

    k = task.dataset.kwargs
    return build_solver(task.model.name, task.model.kwargs, in_channels=k.channels, num_classes=k.num_classes, load_pretrained=load_pretrained)


def build_strategy(task: TaskConfig, load_pretrained: bool, solver: nn.Module | None = None) -> Strategy:
    """A fresh strategy (and its solver, unless ``solver`` is given) for ``task``."""
    cls = get_strategy_class(task.strategy.name)
    options = parse_options(cls, task.strategy.kwargs)
    return cls(options, solver if solver is not None else build_task_solver(task, load_pretrained), task)


def check_task_builds(task: TaskConfig, load_pretrained: bool) -> Strategy:
    """Pre-flight of a site's config, in about the time it takes to build its networks: the solver
    builds (with ``load_pretrained``, a configured ``pretrained_path`` is read into it), takes a
    training batch of ``train.batch_size`` at ``dataset.kwargs.img_size`` (a solver may say what
    it needs with ``check_training_input(batch_size, height, width)``), maps a batch of 2 zero
    images to logits of the configured classes (refused first where that would not fit in this
    machine's memory), the strategy builds on it, and its loss (a ``criterion``, where it has one)
    takes those logits. Returns the strategy; a ConfigError naming the key (not the file) otherwise."""
    from relaylearn.memory import require_memory

    k = task.dataset.kwargs
    height, width = k.img_size
    require_memory(k.img_size, 2, "cpu")
    model = f"model '{task.model.name}'"
    solver = _built(lambda: build_task_solver(task, load_pretrained), f"common.model: {model} does not build")
    check_input = getattr(solver, "check_training_input", None)
    if check_input is not None:
        check_input(task.train.batch_size, height, width)
    zeros = torch.zeros(2, k.channels, height, width)
    with torch.no_grad():
        solver.eval()
        logits = _built(lambda: solver(zeros), f"common.dataset.kwargs.img_size: {model} does not run on {k.channels}-channel {height}x{width} images")
        solver.train()
    expected = (2, k.num_classes, height, width)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"common.model: {model} maps images [2, {k.channels}, {height}, {width}] to {got}, not to logits {list(expected)}")
    strategy = _built(lambda: build_strategy(task, load_pretrained, solver=solver), f"common.strategy: strategy '{task.strategy.name}' does not build")
    criterion = getattr(strategy, "criterion", None)
    if isinstance(criterion, nn.Module):
        with torch.no_grad():
            _built(lambda: criterion(logits, torch.zeros(2, height, width, dtype=torch.long)), "common.train.loss: the loss does not run")
    return strategy


def _built(make, failure: str):
    """``make()``; a RelayError passes, any other error becomes a ConfigError ``failure: <its first line>``."""
    try:
        return make()
    except RelayError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a config makes a network or loss do
        raise ConfigError(f"{failure}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    from relaylearn.bundle import escape_text

    text = str(exc).strip()
    return escape_text(text.splitlines()[0] if text else type(exc).__name__)[:200]


def _measure_bundle_networks(task: TaskConfig, bundle) -> None:
    """Before the strategy of a bundle's recipe is allocated: built on the meta device (no memory),
    it must take the recipe's image size (the solver's ``check_training_input``), must not ship more
    values than the bundle carries, and all its networks must fit this machine's available memory.
    VerificationError (exit 3) naming the bundle otherwise: a signed recipe may ask for networks of
    tens of GB within every option's limits."""
    from relaylearn.memory import available_host_memory, format_bytes

    try:
        with torch.device("meta"):
            probe = build_strategy(task, load_pretrained=False)
            shipped = probe.state_to_bundle().tensors
    except RelayError:
        raise
    except Exception as exc:  # noqa: BLE001 - what the recipe makes the constructors do
        if is_plugin(task.strategy.name) or is_plugin(task.model.name):
            return  # local code this site chose: it need not build on the meta device
        raise VerificationError(f"the bundle's recipe does not build here: {_first_line(exc)}", bundle.path) from None
    check_input = getattr(probe.solver, "check_training_input", None)
    if check_input is not None:
        height, width = task.dataset.kwargs.img_size
        try:  # a batch of 2 or more: only the size is in question here
            check_input(max(2, task.train.batch_size), height, width)
        except UserError as exc:
            raise VerificationError(f"the bundle's recipe does not build here: {exc.message}", bundle.path) from None
    values, carried = sum(t.numel() for t in shipped.values()), sum(t.numel() for t in bundle.tensors.values())
    if values > carried:  # a fresh strategy ships no more than a trained one
        problem = _tensor_mismatch(shipped, bundle.tensors) or f"its recipe builds networks that ship {values} values, the bundle carries {carried}"
        raise VerificationError(f"bundle does not fit strategy '{task.strategy.name}': {problem}", bundle.path)
    need = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    have = available_host_memory()
    if have is not None and need > have:
        raise VerificationError(
            f"the networks of the bundle's recipe take about {format_bytes(need)}, this machine has {format_bytes(have)} available", bundle.path
        )


def _tensor_mismatch(expected: dict, carried: dict) -> str | None:
    """The first tensor (by name) that the strategy's ``expected`` and a bundle's ``carried``
    tensors disagree on (absent, shape, dtype), in words; None when they agree."""
    from relaylearn.bundle import escape_text

    describe = lambda t: "absent" if t is None else f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"  # noqa: E731
    for name in sorted(set(expected) | set(carried)):
        want, got = expected.get(name), carried.get(name)
        if want is None or got is None or want.shape != got.shape or want.dtype != got.dtype:
            return f"tensor '{escape_text(name)}' is {describe(got)} in the bundle, {describe(want)} in the strategy"
    return None


def load_bundle_state(strategy: Strategy, bundle, strategy_name: str) -> None:
    """Load ``bundle``'s tensors into ``strategy``, requiring an exact fit: the same tensor names,
    shapes and dtypes as the strategy's own state afterwards. VerificationError (exit 3) otherwise."""

    fresh = strategy.state_to_bundle().tensors
    try:
        strategy.state_from_bundle(BundleState(tensors=bundle.tensors, meta=bundle.manifest.get("registry", {})))
        problem = _tensor_mismatch(strategy.state_to_bundle().tensors, bundle.tensors)
    except Exception as exc:  # noqa: BLE001 - whatever the tensors or registry do to the strategy
        problem = _tensor_mismatch(fresh, bundle.tensors) or _first_line(exc)
    if problem:
        raise VerificationError(f"bundle does not fit strategy '{strategy_name}': {problem}", bundle.path)


def restore_strategy(task: TaskConfig, bundle=None) -> Strategy:
    """The strategy of ``task``: fresh (with the configured pretrained weights) without a
    ``bundle``, else restored from the verified ``bundle`` with an exact fit (exit 3 otherwise)."""
    if bundle is None:
        return build_strategy(task, load_pretrained=True)
    _measure_bundle_networks(task, bundle)
    try:
        strategy = build_strategy(task, load_pretrained=False)
    except RelayError:
        raise
    except Exception as exc:  # noqa: BLE001 - a recipe the bundle brought that this version cannot build
        raise VerificationError(f"the bundle's recipe does not build here: {_first_line(exc)}", bundle.path) from None
    load_bundle_state(strategy, bundle, task.strategy.name)
    return strategy


def check_bundle_fits(bundle, task: TaskConfig) -> Strategy:
    """Before anything is recorded or written: the verified ``bundle`` must come from this site's
    strategy and its tensors must load into it exactly (names, shapes, dtypes). Exit 3 otherwise.
    Returns the strategy restored from it."""
    from relaylearn.bundle import escape_text

    if bundle.strategy != task.strategy.name:
        raise VerificationError(
            f"bundle was written by strategy '{escape_text(bundle.strategy)}' but this site's config uses '{task.strategy.name}'",
            bundle.path,
        )
    return restore_strategy(task, bundle)


def strategy_from_bundle(bundle, plugins: tuple[str, ...] | set[str] = ()) -> tuple[Strategy, TaskConfig]:
    """Rebuild the strategy that wrote ``bundle`` (already verified) and load its state.

    Nothing named by the bundle is imported: its strategy and model names resolve only against the
    built-in registry; a plug-in (``package.module:Name``) only when it is in ``plugins``, the names
    your local config uses. VerificationError (exit 3) otherwise, or when the tensors do not fit."""
    from relaylearn.bundle import escape_text
    from relaylearn.recipe import shipped_task_config

    task = shipped_task_config(bundle.manifest["config"], bundle.path)
    for what, name in (("strategy", task.strategy.name), ("model", task.model.name), ("data layout", task.dataset.name)):
        if is_plugin(name) and name not in plugins:
            raise VerificationError(
                f"bundle names the plug-in {what} '{escape_text(name)}'; code named by a bundle is never imported "
                "(only a plug-in your local config names, with -c, is used)",
                bundle.path,
            )
    if bundle.strategy != task.strategy.name:
        raise VerificationError(
            f"bundle strategy '{escape_text(bundle.strategy)}' disagrees with its config's '{escape_text(task.strategy.name)}'", bundle.path
        )
    try:
        return restore_strategy(task, bundle), task
    except UserError as exc:  # the bundle's config does not build here (VerificationError passes through)
        raise VerificationError(f"bundle config: {_first_line(exc)}", bundle.path) from None


def local_plugins(cfg: RunConfig | None) -> set[str]:
    """The plug-in names (``package.module:Name``) a local config uses for its strategy, model or data layout."""
    if cfg is None:
        return set()
    return {name for t in cfg.tasks for name in (t.strategy.name, t.model.name, t.dataset.name) if is_plugin(name)}


def read_any_bundle(path: Path, trust_dir: str | None, *, no_verify: bool = False):
    """Read a bundle for local use: fully verified with ``trust_dir`` (signature, hops bound to
    their signers' sites, the trust folder's relay id). Without it only with ``no_verify``: the
    container, hashes, tensor index and values are checked but not the signature, and the returned
    bundle's ``signed_by`` is None (outputs record it as not verified). UserError otherwise."""
    from relaylearn.bundle import existing_bundle, read_bundle
    from relaylearn.keys import load_trust_dir, read_relay_id

    if trust_dir:
        trust = load_trust_dir(trust_dir)
        return read_bundle(existing_bundle(path), trust=trust, expect_relay_id=read_relay_id(trust_dir), bind_sites=True)
    if not no_verify:
        raise UserError("pass --trust DIR to verify the bundle, or --no-verify to use it unverified", path)
    return read_bundle(existing_bundle(path), trust=None, allow_unsigned=True)


def provenance(bundle) -> dict:
    """What an output records about the bundle it came from."""
    return {
        "bundle": str(bundle.path),
        "bundle_sha256": bundle.sha256,
        "relay_id": bundle.manifest["relay_id"],
        "verified": bundle.signed_by is not None,
        "signed_by": bundle.signed_by,
    }


@dataclass
class LoadedModel:
    """A bundle's solver, ready for inference, with what is needed to feed it."""

    solver: nn.Module  # images [B, C, H, W] in out_range → logits [B, K, H, W]; eval mode
    img_size: tuple[int, int]  # (H, W) the model was trained at
    out_range: tuple[float, float]
    channels: int
    num_classes: int
    class_names: tuple[str, ...]
    layout: Layout  # the data layout of the config: mask encoding, class names, extra measures
    bundle_sha256: str
    strategy: str
    verified: bool = False  # False: read with --no-verify (signature not checked)
    signed_by: str | None = None
    hu: tuple[float, float, float] | None = None  # CT models: (hu_min, window low, window high) for 16-bit slices


def load_model(
    bundle: str | Path, trust: str | None = None, device: torch.device | str = "cpu", *, no_verify: bool = False, plugins: set[str] | tuple[str, ...] = ()
) -> LoadedModel:
    """Read and verify (with ``trust``; else only with ``no_verify``) a bundle and rebuild its
    solver in eval mode. ``plugins``: plug-in names of your local config the bundle may use."""
    b = read_any_bundle(Path(bundle), trust, no_verify=no_verify)
    strategy, task = strategy_from_bundle(b, plugins)
    k = task.dataset.kwargs
    layout = get_layout(task.dataset.name)  # a plug-in only when the local config names it (checked above)
    return LoadedModel(
        solver=strategy.solver.to(device).eval(),
        img_size=tuple(k.img_size),
        out_range=tuple(k.out_range),
        channels=k.channels,
        num_classes=k.num_classes,
        class_names=layout.class_names(k.num_classes),
        layout=layout,
        bundle_sha256=b.sha256,
        strategy=b.manifest["strategy"],
        verified=b.signed_by is not None,
        signed_by=b.signed_by,
        hu=layout.hu_window(k),
    )
