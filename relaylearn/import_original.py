"""``relaylearn import-original``: turn a checkpoint written by the original Relay Learning code
(a PyTorch Lightning 1.3 ``.ckpt``) into a relay bundle.

Such a file is a pickle. It is read with PyTorch's weights-only unpickler, which builds nothing
but tensors and plain containers (dict, list, tuple, str, numbers). Two names that every
Lightning 1.3 checkpoint holds are admitted as inert stand-ins: ``AttributeDict`` (hyper-parameters,
read as a plain dict) and the ``ModelCheckpoint`` class used as a key of the callback state
(replaced by a marker class, never instantiated). Anything else is refused (exit 3); a file that
is not such a checkpoint at all (a folder, text, another pickle) is bad input (exit 2).

Name mapping (``state_dict`` entries carry the prefix ``model.``):

* solver only (sequential / local / joint checkpoints): ``model.<unet>``;
  full relay (DoubleGAN): ``model.solver.*``, ``model.G_img.*``, ``model.G_label.*``,
  ``model.D_img.*``, ``model.D_label.*``, ADA pipes and scalars, plus ``RL_meta`` (site registry).
* U-Net: ``encoder.*`` kept (torchvision names), ``up<k>.up`` → ``decoder.<k-1>.up``,
  ``up<k>.conv.double_conv.<i>`` → ``decoder.<k-1>.conv.<i>``, ``outc.conv`` → ``head``;
  ``encoder.fc.*`` (a frozen classifier the original never calls) is dropped.
* Generators: ``synthesis.b<R>`` → ``synthesis.blocks.<log2(R)−2>``, ``torgb`` → ``to_rgb``,
  ``noise_strength`` / ``noise_const`` → ``noise.strength`` / ``noise.const_noise``,
  SPADE ``param_free_norm`` / ``mlp_shared.0`` / ``mlp_gamma`` / ``mlp_beta`` → ``norm`` /
  ``shared`` / ``gamma`` / ``beta``, ``mapping.fc<i>`` → ``mapping.layers.<i>``.
* Discriminators: ``b<R>`` (R > 4) → ``blocks.<log2(top/R)>``, ``fromrgb`` → ``from_rgb``,
  ``b4`` → ``epilogue``, ``mapping.fc<i>`` → ``mapping.layers.<i>``.
* Dropped: the ``*_old`` copies (frozen previous-site networks), the fixed FIR filters
  (``resample_filter``, ADA ``Hz_geom`` / ``Hz_fbank``: constants rebuilt by relaylearn),
  ``zero_loss``, ``ada_D_signs_real_*``, FID feature extractors, strategy bookkeeping buffers.

Every mapped tensor must exist in the network the config builds, with the same shape, a real
dtype of the same kind (float → float casts only) and finite values, and every tensor that
network ships must be found; otherwise the import stops with one line naming the file (exit 2).
"""

from __future__ import annotations

import math
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from relaylearn.errors import UserError, VerificationError
from relaylearn.strategies.base import meta_number

#: networks of the original's relay model (DoubleGAN) → relaylearn's attribute names
RELAY_NETWORKS = {"solver": "solver", "G_img": "g_img", "G_label": "g_label", "D_img": "d_img", "D_label": "d_label"}
#: top-level state entries of the DoubleGAN that are not needed (constants, dummies, statistics)
_DROPPED_SCALARS = {"zero_loss", "ada_D_signs_real_img", "ada_D_signs_real_label", "cur_stage", "merge_weight"}


class _LightningCallbackKey:
    """Stands in for the callback class Lightning 1.3 uses as a dict key; never instantiated."""


#: the only non-plain names admitted while unpickling, each replaced by an inert stand-in
_ADMITTED_GLOBALS = [
    (dict, "pytorch_lightning.utilities.parsing.AttributeDict"),
    (_LightningCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


@dataclass
class ImportedCheckpoint:
    """An original checkpoint mapped to relaylearn names.

    ``networks``: original network names found (``solver`` alone, or with ``G_img`` …);
    ``tensors``: relaylearn name → tensor; ``origin``: relaylearn name → the checkpoint's name;
    ``registry``: site name → {"id", "frequency"} of the finished sites (empty for a solver-only
    checkpoint); ``dropped``: counts of what was left out.
    """

    networks: list[str]
    tensors: dict[str, Tensor]
    origin: dict[str, str] = field(default_factory=dict)
    registry: dict[str, dict[str, int]] = field(default_factory=dict)
    merge_weight: float = 0.0
    stage: int = 1
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def is_relay(self) -> bool:
        return "G_img" in self.networks


# ----- reading ----------------------------------------------------------------------------------
def read_original_checkpoint(path: str | Path) -> dict[str, Any]:
    """Unpickle ``path`` with the weights-only loader; returns the checkpoint dict.

    Raises VerificationError (exit 3) for a checkpoint that holds any other pickled object (unsafe
    content, never built); UserError (exit 2) for the wrong file: missing, a folder, not a PyTorch
    checkpoint (a zip or pickle), unreadable, or without a ``state_dict`` of tensors.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError("is a folder; give the checkpoint file (.ckpt)", path)
    if not path.is_file():
        raise UserError("checkpoint not found", path)
    not_checkpoint = "not a PyTorch checkpoint (zip or pickle): give the .ckpt file that the original code wrote"
    with path.open("rb") as handle:
        magic = handle.read(2)
    if not zipfile.is_zipfile(path) and not magic.startswith(b"\x80"):  # torch.save writes a zip, or (legacy) a pickle of protocol >= 2
        raise UserError(not_checkpoint, path)
    try:
        with torch.serialization.safe_globals(_ADMITTED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says what matters, in one line
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # local-only: weights_only loader, never full unpickling
    except pickle.UnpicklingError as exc:
        found = re.search(r"(?:Unsupported global: GLOBAL|Unsupported class|global) ([\w.]+)", str(exc), re.IGNORECASE)
        if found is None:  # not a pickled object to refuse: a pickle torch.save did not write, or no pickle
            stopped = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
            raise UserError(
                f"not a readable PyTorch checkpoint ({stopped.group(1) if stopped else 'not a pickle'})" if magic[:1] == b"\x80" else not_checkpoint, path
            ) from None
        what = f"a pickled object '{found.group(1)}'"
        raise VerificationError(
            f"refused: the checkpoint holds {what} that is not a tensor or plain container (only weights are read; nothing else is unpickled)", path
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as exc:
        text = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"not a readable PyTorch checkpoint ({type(exc).__name__}: {text})", path) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError("not a Lightning checkpoint: no 'state_dict' mapping at the top level", path)
    state = checkpoint["state_dict"]
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise UserError(f"not a Lightning checkpoint of the original code: state_dict entry {str(bad)[:80]!r} is not a tensor", path)
    return checkpoint


# ----- name mapping ------------------------------------------------------------------------------
def _map_unet(name: str) -> str | None:
    """Original U-Net name → relaylearn ``UNetResNet18`` name (None: dropped)."""
    if name.startswith("encoder.fc."):
        return None
    if name.startswith("encoder."):
        return name
    m = re.fullmatch(r"up(\d)\.up\.(.+)", name)
    if m:
        return f"decoder.{int(m.group(1)) - 1}.up.{m.group(2)}"
    m = re.fullmatch(r"up(\d)\.conv\.double_conv\.(\d+)\.(.+)", name)
    if m:
        return f"decoder.{int(m.group(1)) - 1}.conv.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"outc\.conv\.(.+)", name)
    if m:
        return f"head.{m.group(1)}"
    return f"<unmapped>{name}"


def _map_mapping_net(rest: str) -> str:
    m = re.fullmatch(r"fc(\d+)\.(.+)", rest)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else rest


def _map_generator(name: str) -> str | None:
    if name.startswith("mapping."):
        return "mapping." + _map_mapping_net(name[len("mapping.") :])
    m = re.fullmatch(r"synthesis\.b(\d+)\.(.+)", name)
    if not m:
        return f"<unmapped>{name}"
    block, rest = int(math.log2(int(m.group(1)))) - 2, m.group(2)
    if rest.endswith("resample_filter"):
        return None
    for old, new in (
        ("torgb.", "to_rgb."),
        ("spade.param_free_norm.", "spade.norm."),
        ("spade.mlp_shared.0.", "spade.shared."),
        ("spade.mlp_gamma.", "spade.gamma."),
        ("spade.mlp_beta.", "spade.beta."),
    ):
        if rest.startswith(old):
            rest = new + rest[len(old) :]
    rest = re.sub(r"\.noise_strength$", ".noise.strength", rest)
    rest = re.sub(r"\.noise_const$", ".noise.const_noise", rest)
    return f"synthesis.blocks.{block}.{rest}"


def _map_discriminator(name: str, top: int) -> str | None:
    if name.startswith("mapping."):
        return "mapping." + _map_mapping_net(name[len("mapping.") :])
    m = re.fullmatch(r"b(\d+)\.(.+)", name)
    if not m:
        return f"<unmapped>{name}"
    res, rest = int(m.group(1)), m.group(2)
    if rest.endswith("resample_filter"):
        return None
    if res == 4:
        return f"epilogue.{rest}"
    rest = "from_rgb." + rest[len("fromrgb.") :] if rest.startswith("fromrgb.") else rest
    return f"blocks.{int(math.log2(top // res))}.{rest}"


def map_original_state(state: dict[str, Tensor], rl_meta: Any = None) -> ImportedCheckpoint:
    """Map a Lightning ``state_dict`` of the original code to relaylearn names (no shape checks yet)."""
    model = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not model:
        raise UserError("no 'model.*' tensors in state_dict: not a checkpoint of the original Relay Learning code")
    dropped: dict[str, int] = {}

    def drop(why: str) -> None:
        dropped[why] = dropped.get(why, 0) + 1

    relay = any(k.startswith("solver.") for k in model)
    tensors: dict[str, Tensor] = {}
    origin: dict[str, str] = {}

    def put(new: str, name: str) -> None:
        tensors[new], origin[new] = model[name], f"model.{name}"

    networks: list[str] = []
    if not relay:
        networks.append("solver")
        for name in model:
            new = _map_unet(name)
            if new is None:
                drop("unused encoder.fc")
            else:
                put(f"<unmapped>{name}" if new.startswith("<unmapped>") else f"solver.{new}", name)
        return ImportedCheckpoint(networks, tensors, origin, dropped=dropped)

    tops = {k.split(".")[1] for k in model if re.match(r"D_img\.b\d+\.", k)}
    top = max((int(b[1:]) for b in tops), default=4)
    for name in model:
        head, _, rest = name.partition(".")
        if head.endswith("_old") and head[: -len("_old")] in RELAY_NETWORKS:
            drop("*_old copies")
        elif head in RELAY_NETWORKS:
            if head not in networks:
                networks.append(head)
            if head == "solver":
                new = _map_unet(rest)
            elif head.startswith("G_"):
                new = _map_generator(rest)
            else:
                new = _map_discriminator(rest, top)
            if new is None:
                drop("fixed filters / unused fc")
            else:
                put(f"<unmapped>{name}" if new.startswith("<unmapped>") else f"{RELAY_NETWORKS[head]}.{new}", name)
        elif head in ("augment_pipe_img", "augment_pipe_label"):
            if rest == "p":
                put("ada_img.p" if head.endswith("img") else "ada_label.p", name)
            else:
                drop("fixed filters / unused fc")
        elif name in ("pl_mean_img", "pl_mean_label"):
            put(name, name)
        elif name in _DROPPED_SCALARS:
            drop("dummies and statistics")
        elif head.startswith("fid"):
            drop("FID feature extractors")
        else:
            put(f"<unmapped>{name}", name)
    order = [n for n in RELAY_NETWORKS if n in networks]
    merge_weight, stage = _scalar(model, "merge_weight", 0.0), _scalar(model, "cur_stage", 1)
    if not (math.isfinite(merge_weight) and merge_weight >= 0) or stage not in (1, 2):
        raise UserError(f"merge_weight {merge_weight} / cur_stage {stage}: expected a finite weight ≥ 0 and stage 1 or 2 (a relay checkpoint of the original)")
    return ImportedCheckpoint(order, tensors, origin, _registry_from_meta(rl_meta), float(merge_weight), int(stage), dropped)


def _scalar(model: dict[str, Tensor], name: str, default: float) -> float:
    """The single real number ``model[name]`` holds (``default`` when absent)."""
    t = model.get(name)
    if t is None:
        return default
    if t.numel() != 1 or t.is_complex():
        raise UserError(f"tensor 'model.{name}' has shape {list(t.shape)} and dtype {t.dtype}: expected a single real number")
    return t.item()


def _registry_from_meta(rl_meta: Any) -> dict[str, dict[str, int]]:
    """``RL_meta`` → one registry of finished sites (the site being trained at save time included);
    ids and frequencies must be integers ≥ 0 (ids shared by two sites are refused by the strategy)."""
    registry: dict[str, dict[str, int]] = {}
    if not isinstance(rl_meta, dict):
        return registry
    for part in ("cs_previous_task", "cs_current_task"):
        entries = rl_meta.get(part) or {}
        if not isinstance(entries, dict):
            raise UserError(f"RL_meta.{part}: expected a mapping of site name -> {{id, frequency}}")
        for name, e in entries.items():
            try:
                if not isinstance(e, dict):
                    raise ValueError("expected {'id': int, 'frequency': int}")
                site_id, freq = meta_number(e, "id", None, integer=True), meta_number(e, "frequency", 0, integer=True)
            except ValueError as exc:
                raise UserError(f"RL_meta.{part}.{str(name)[:40]}: {exc}") from None
            slot = registry.setdefault(str(name), {"id": site_id, "frequency": 0})
            slot["frequency"] += freq
    return dict(sorted(registry.items(), key=lambda kv: kv[1]["id"]))


# ----- checking against the config -----------------------------------------------------------------
def check_against(imported: ImportedCheckpoint, expected: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """Tensors of ``imported`` restricted to and checked against ``expected`` (name → tensor).

    Raises UserError naming the first unmapped, unknown or missing tensor, or one of the wrong
    shape, dtype (complex, or of another kind: float ↔ integer) or with NaN / infinite values.
    """
    unmapped = sorted(k for k in imported.tensors if k.startswith("<unmapped>"))
    if unmapped:
        raise UserError(
            f"checkpoint tensor 'model.{unmapped[0][len('<unmapped>') :]}' has no counterpart in relaylearn "
            f"({len(unmapped)} such tensor(s)); is this a checkpoint of the original Relay Learning code?"
        )
    unknown = sorted(set(imported.tensors) - set(expected))
    if unknown:
        raise UserError(f"checkpoint {_label(imported, unknown[0])} does not exist in the network {what} builds")
    missing = sorted(set(expected) - set(imported.tensors))
    if missing:
        raise UserError(f"checkpoint lacks '{missing[0]}' ({len(missing)} tensor(s) missing) that {what} needs")
    for name, ref in expected.items():
        got = imported.tensors[name]
        tensor = _label(imported, name)
        if tuple(got.shape) != tuple(ref.shape):
            raise UserError(
                f"{tensor} has shape {list(got.shape)} in the checkpoint but {list(ref.shape)} "
                f"in the network {what} builds (check model/strategy sizes, channels and num_classes)"
            )
        if got.is_complex() or got.is_floating_point() != ref.is_floating_point():
            raise UserError(f"{tensor} has dtype {got.dtype} in the checkpoint but {ref.dtype} in the network {what} builds")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UserError(f"{tensor} holds NaN or infinite values (did the original training diverge?)")
    return {name: imported.tensors[name].to(expected[name].dtype).contiguous() for name in expected}


def _label(imported: ImportedCheckpoint, name: str) -> str:
    """``tensor '<checkpoint name>' ('<relaylearn name>')`` for messages."""
    return f"tensor '{imported.origin[name]}' ('{name}')" if name in imported.origin else f"tensor '{name}'"


@contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """A UserError raised inside names ``path`` (what is wrong is inside that file)."""
    try:
        yield
    except UserError as exc:
        raise UserError(exc.message, exc.path or path) from None


def import_original(ckpt: str | Path, config: str, out: str | Path, key: str | None = None, sets: list[str] | None = None) -> tuple[Path, ImportedCheckpoint]:
    """Read ``ckpt``, map and check it against the network ``config`` builds, write a bundle at ``out``."""
    from relaylearn.assembly import build_strategy, shipped_config
    from relaylearn.bundle import write_bundle
    from relaylearn.compare import with_strategy_kwargs
    from relaylearn.config import load_config
    from relaylearn.files import check_new_bundle_path, utc_now
    from relaylearn.keys import load_private_key
    from relaylearn.strategies.base import BundleState

    check_new_bundle_path(Path(out))
    signing_key = load_private_key(key) if key else None
    checkpoint = read_original_checkpoint(ckpt)
    with _naming(ckpt):
        imported = map_original_state(checkpoint["state_dict"], checkpoint.get("RL_meta"))
    cfg = load_config(config, sets)
    relay_config = cfg.tasks[-1].strategy.name == "relay"
    if relay_config and not imported.is_relay:
        raise UserError(
            f"the checkpoint holds only a solver, but config '{cfg.name}' uses strategy 'relay', which needs "
            "the generators: use a config with strategy sequential, local or joint"
        )
    if relay_config:
        cfg = with_strategy_kwargs(cfg, _relay_settings(imported, sets or []))
    task = cfg.tasks[-1]
    strategy = build_strategy(task, load_pretrained=False)
    if imported.is_relay and not relay_config:  # keep the solver only
        _drop(imported, lambda k: not k.startswith("solver."), "generators/discriminators (config is not relay)")
    elif relay_config and not strategy.options.ship_discriminators:  # --set strategy.kwargs.ship_discriminators=false
        _drop(imported, lambda k: k.startswith(("d_img.", "d_label.")), "discriminators (ship_discriminators is false)")
    expected = strategy.state_to_bundle().tensors
    with _naming(ckpt):
        tensors = check_against(imported, expected, f"config '{cfg.name}'")

    sites_by_task = sorted((d.kwargs.task_id or 0, d.site) for d in cfg.test_datasets)
    last_id = task.dataset.kwargs.task_id or 0
    meta = strategy.meta()
    meta["sites_seen"] = [site for tid, site in sites_by_task if tid <= last_id] or [task.dataset.site]
    if relay_config:  # the site registry is checked as when a bundle is read
        if imported.registry and (
            len(imported.registry) > strategy.options.site_capacity or max(e["id"] for e in imported.registry.values()) >= strategy.options.site_capacity
        ):
            raise UserError(f"RL_meta lists site ids beyond strategy.kwargs.site_capacity={strategy.options.site_capacity}", ckpt)
        meta.update(site_registry=imported.registry, site_registry_current={}, merge_weight=imported.merge_weight, stage=imported.stage)
        meta["sites_seen"] = list(imported.registry) or meta["sites_seen"]
        # the original's SPADE convolutions are plain: state_from_bundle rescales them when this
        # config uses equalised lr (spade_equalized_lr), so the generator computes the same function
        meta["spade_conv"] = "plain"
    try:
        strategy.state_from_bundle(BundleState(tensors=tensors, meta=meta))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(f"the checkpoint does not load into strategy '{task.strategy.name}': {str(exc).splitlines()[0]}", ckpt) from None
    state = strategy.state_to_bundle()
    started = utc_now()
    path = write_bundle(
        out,
        state.tensors,
        strategy=task.strategy.name,
        config=shipped_config(task),
        registry=state.meta,
        site=signing_key.site if signing_key is not None else task.dataset.site,  # a signed hop names its signer's site
        hop_started_utc=started,
        parent=None,
        signing_key=signing_key,
        extra={"imported_from": "original Relay Learning checkpoint", "networks": imported.networks},
    )
    return Path(path), imported


def _drop(imported: ImportedCheckpoint, dropped: Callable[[str], bool], why: str) -> None:
    """Leave out the mapped tensors whose names ``dropped`` selects, counted under ``why``."""
    count = sum(1 for k in imported.tensors if dropped(k))
    if count:
        imported.dropped[why] = count
        imported.tensors = {k: v for k, v in imported.tensors.items() if not dropped(k)}


def _relay_settings(imported: ImportedCheckpoint, sets: list[str]) -> dict[str, Any]:
    """Strategy options a relay checkpoint fixes, noted in ``imported.notes``: the original's
    label-generator width (unless ``--set`` gives ``w_label``), no discriminators if it has none."""
    settings: dict[str, Any] = {}
    w_avg = imported.tensors.get("g_label.mapping.w_avg")
    if w_avg is not None and w_avg.ndim == 1 and not any(s.split("=", 1)[0].endswith("w_label") for s in sets):
        # the original's label generator used z_label as its latent width, whatever w_label said
        settings["w_label"] = int(w_avg.shape[0])
        imported.notes.append(f"strategy.kwargs.w_label={settings['w_label']} (the original's label-generator width; continue this relay with the same value)")
    if "D_img" not in imported.networks:
        settings["ship_discriminators"] = False
        imported.notes.append("strategy.kwargs.ship_discriminators=false (the checkpoint holds no discriminators)")
    return settings


def describe(imported: ImportedCheckpoint) -> str:
    """One paragraph for the terminal: which networks were found and what was dropped."""
    kind = (
        "full relay (solver, generators" + (", discriminators" if "D_img" in imported.networks else "") + ", site registry)"
        if imported.is_relay
        else "solver only"
    )
    lines = [f"found: {kind}; networks: {', '.join(imported.networks)}"]
    if imported.registry:
        lines.append("site registry: " + ", ".join(f"{_printable(n)} (id {e['id']})" for n, e in imported.registry.items()))
    if imported.dropped:
        lines.append("dropped: " + ", ".join(f"{n} {why}" for why, n in imported.dropped.items()))
    lines += [f"set {note}" for note in imported.notes]
    return "\n".join(lines)


def _printable(text: str) -> str:
    """Site names come from the file: show them without control characters."""
    return "".join(c if c.isprintable() else "?" for c in str(text))[:64]
