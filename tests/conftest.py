"""Shared fixtures (a tiny synthetic multi-site dataset made once per session) and the helpers
several test modules use: a tiny config, the CLI run in-process, a one-hop bundle, the strategy
test scaffolding and hand-built bundle containers. Import shared helpers from here (or from a
folder's own conftest.py), never from another test module."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# xdist runs two workers on two cores: every training the tests start in a subprocess gets one
# thread too (two OpenMP teams spinning on one core each slow each other down many times over)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml

if TYPE_CHECKING:
    from torch import nn

    from relaylearn.strategies.base import SiteContext, StepContext

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` (not a package) imported as module ``bench_<name>``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_fundus(tmp_path_factory) -> Path:
    """A DoFE-layout dataset: 3 sites, a few 32-px images each (written by the synthetic generator)."""
    from relaylearn.data.synth import write_synthetic_benchmark

    root = tmp_path_factory.mktemp("fundus")
    write_synthetic_benchmark(root, size=32, seed=3, counts={"Domain1": (6, 4), "Domain2": (6, 4), "Domain3": (4, 4)})
    return root


def tiny_config(
    tmp_path: Path, data_root: Path, strategy: str = "sequential", task_ids=(1, 2), steps: int = 3, strategy_kwargs=None, img: int = 32, **train
) -> Path:
    """Write a minimal config that trains ``task_ids`` for ``steps`` batches each on ``data_root``."""
    cfg = {
        "common": {
            "random_seed": 7,
            "dataset": {"name": "fundus", "kwargs": {"root_path": str(data_root), "img_size": [img, img], "num_classes": 3}},
            "strategy": {"name": strategy, "kwargs": strategy_kwargs or {}},
            "model": {"name": "unet"},
            "train": {"num_steps": steps, "batch_size": 4, "log_every_n_steps": 1, **train},
            "test": {"batch_size": 8, "bootstrap": 200},
            "audit": {"n_generated": 50, "n_bootstrap": 100},  # the per-hop privacy audit of relay runs, kept cheap
        },
        "all_tasks_datasets": [
            {"kwargs": {"task_id": 1, "task_name": "Domain1", "img_folder": "Domain1"}},
            {"kwargs": {"task_id": 2, "task_name": "Domain2", "img_folder": "Domain2"}},
            {"kwargs": {"task_id": 3, "task_name": "Domain3", "img_folder": "Domain3"}},
        ],
        "current_tasks": {"task_ids": list(task_ids)},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{strategy.split(':')[-1]}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----- helpers shared by several test modules (import them from here, not from another test module) --
#: relay strategy kwargs with tiny GANs: a relay hop trains in seconds on the CPU
TINY = {
    "z_img": 8,
    "z_label": 8,
    "w_img": 16,
    "w_label": 16,
    "site_capacity": 3,
    "spade_hidden": 8,
    "g_img": {"mapping_layers": 1, "channel_base": 128, "channel_max": 16},
    "g_label": {"mapping_layers": 1, "channel_base": 64, "channel_max": 8},
    "d_img": {"channel_base": 128, "channel_max": 16, "mapping_layers": 1},
    "d_label": {"channel_base": 64, "channel_max": 8, "mapping_layers": 1},
    "ada_kimg": 1,
    "replay_augment": "light",
}


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(cwd: Path, *args: str) -> Result:
    """``relaylearn ARGS`` in-process, in the folder ``cwd`` (where its ``exps/`` lives).

    The HTML report that ``train`` writes at the end is skipped (seconds each; tested elsewhere).
    """
    from relaylearn import cli

    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            patch.setattr(cli, "_auto_report", lambda run_dir, quiet: None)
            code = cli.main([str(a) for a in args])
    finally:
        os.chdir(previous)
    return Result(code, out.getvalue(), err.getvalue())


def only_line(text: str) -> str:
    """The one non-blank line of ``text`` (asserts there is exactly one and no traceback)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    assert "Traceback" not in text
    return lines[0]


def one_line_error(text: str) -> str:
    """The one line of a command's stderr, which must be a ``relaylearn: error: ...`` line."""
    line = only_line(text)
    assert line.startswith("relaylearn: error: "), line
    return line


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's JSON.parse and jq do."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def make_bundle(
    path: Path, *, channels: int = 3, num_classes: int = 3, img: int = 32, dataset: str = "fundus", seed: int = 0, train: dict | None = None
) -> Path:
    """An unsigned one-hop 'sequential' bundle with a freshly initialised U-Net (shared by the
    predict and report tests); ``train``: its recipe's train block (default: one step)."""
    from relaylearn.assembly import build_strategy, shipped_config
    from relaylearn.bundle import write_bundle
    from relaylearn.config import TaskConfig
    from relaylearn.files import utc_now

    task = TaskConfig.model_validate({
        "train": train or {"num_steps": 1},
        "strategy": {"name": "sequential"},
        "dataset": {"name": dataset, "kwargs": {"img_size": [img, img], "num_classes": num_classes, "channels": channels, "task_id": 1, "task_name": "Site1"}},
    })  # fmt: skip
    torch.manual_seed(seed)
    strategy = build_strategy(task, load_pretrained=False)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in strategy.solver.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = strategy.state_to_bundle()
    return write_bundle(
        path,
        state.tensors,
        strategy=task.strategy.name,
        config=shipped_config(task),
        registry=state.meta,
        site="Site1",
        hop_started_utc=utc_now(),
        parent=None,
        signing_key=None,
    )


def stopped_training(*args, **kwargs):
    """A stand-in for ``run_training``: a training stopped by SIGTERM, raised through the engine's own handler."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from relaylearn.engine import _stops_as_interrupted

    with _stops_as_interrupted(None, "Domain1"):
        raise SIGTERMException


# ----- helpers shared by the strategy tests --------------------------------------------------------
def make_strategy(name: str, solver: nn.Module, **kwargs):
    """A strategy around ``solver`` with a minimal resolved config (Adam lr 1e-3, ExpLogLoss)."""
    from relaylearn.config import TaskConfig
    from relaylearn.strategies import get_strategy_class
    from relaylearn.strategies.base import parse_options

    cls = get_strategy_class(name)
    task = TaskConfig.model_validate({"train": {"num_steps": 1}, "strategy": {"name": name, "kwargs": kwargs}})
    strategy = cls(parse_options(cls, kwargs), solver, task)
    strategy.optimizers = strategy.configure_optimizers()
    return strategy


def make_site(images: torch.Tensor, labels: torch.Tensor, position: int = 0, steps: int = 1, name: str = "A") -> SiteContext:
    from relaylearn.strategies.base import SiteContext

    return SiteContext(
        name=name,
        task_id=position + 1,
        position=position,
        num_images=len(images),
        num_epochs=1,
        steps_per_epoch=steps,
        train_images=images,
        train_labels=labels,
        batch_size=len(images),
    )


def make_step(site: SiteContext, step: int = 0) -> StepContext:
    from relaylearn.strategies.base import StepContext

    return StepContext(step=step, global_step=step, epoch=0, site=site)


def relay_two_sites(tmp_path, data, strategy: str, **strategy_kwargs):
    """Train Domain1 → Domain2 for 2 batches each; returns the runner's result."""
    from relaylearn.config import load_config
    from relaylearn.runner import TrainOptions, run_training

    cfg = load_config(str(tiny_config(tmp_path, data, strategy=strategy, steps=2, strategy_kwargs=strategy_kwargs)))
    return run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))


def read_bundle_tensors(path) -> dict[str, torch.Tensor]:
    from relaylearn.bundle import read_bundle

    return read_bundle(path, trust=None, allow_unsigned=True).tensors


# ----- bundle containers written by hand (the attacks on verification) ------------------------------
def container_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A bundle container in the writer's own layout holding exactly ``members``, in this order."""
    from relaylearn.bundle import _container_parts

    return b"".join(bytes(part) for part in _container_parts(members))


def signed_container(manifest: bytes, weights: bytes, key) -> bytes:
    """The canonical three-member container of these manifest bytes and weights, signed by ``key``."""
    from relaylearn.bundle import MANIFEST_NAME, SIGNATURE_NAME, WEIGHTS_NAME

    return container_bytes([(MANIFEST_NAME, manifest), (WEIGHTS_NAME, weights), (SIGNATURE_NAME, key.sign(manifest))])


def forge_bundle(src, dst, key, *, edit=None, weights: bytes | None = None, tensors=None, dump=None, update_hash: bool = True) -> Path:
    """Rebuild bundle ``src`` as ``dst`` with an edited manifest and/or new weights, signed by ``key``
    (``None``: the old signature is kept) in the canonical container.

    This models the strongest attacker: one holding a trusted key (a trusted site gone rogue, or a
    stolen key). ``weights``: raw weights bytes; ``tensors``: a state dict, saved as safetensors and
    listed in the manifest's ``tensors``; both set ``weights_sha256`` / ``weights_bytes`` unless
    ``update_hash`` is false. The last hop's ``signer`` is set to ``key`` before ``edit`` runs (so an
    edit can still change it). ``dump``: manifest dict → bytes (default: the writer's own).
    """
    from relaylearn.bundle import MANIFEST_NAME, SIGNATURE_NAME, WEIGHTS_NAME, _dump_manifest

    with zipfile.ZipFile(src) as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(parts[MANIFEST_NAME])
    if tensors is not None:
        import safetensors.torch

        weights = safetensors.torch.save(tensors)
        manifest["tensors"] = {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors.items()}
    if weights is not None:
        parts[WEIGHTS_NAME] = weights
        if update_hash:
            manifest["weights_sha256"] = hashlib.sha256(weights).hexdigest()
            manifest["weights_bytes"] = len(weights)
    if key is not None:
        manifest["hops"][-1]["signer"] = key.fingerprint
    if edit is not None:
        edit(manifest)
    manifest_bytes = (dump or _dump_manifest)(manifest)
    if key is not None:
        data = signed_container(manifest_bytes, parts[WEIGHTS_NAME], key)
    else:
        data = container_bytes([(MANIFEST_NAME, manifest_bytes), (WEIGHTS_NAME, parts[WEIGHTS_NAME]), (SIGNATURE_NAME, parts[SIGNATURE_NAME])])
    Path(dst).write_bytes(data)
    return Path(dst)
