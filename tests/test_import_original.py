"""``relaylearn import-original``: checkpoints in the original code's format (built from the listings
of its state dicts in tests/fixtures/original_checkpoint) become bundles that evaluate identically."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from relaylearn.cli import main
from relaylearn.errors import UserError, VerificationError
from relaylearn.import_original import map_original_state, read_original_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "original_checkpoint"
ROOT = Path(__file__).resolve().parent.parent
_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def listing(name: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) per line of a listing ``name shape dtype``."""
    rows = []
    for line in (FIXTURES / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        tensor_name, rest = line.split(" ", 1)
        shape_text, dtype = rest.rsplit(" ", 1)
        shape = tuple(int(x) for x in shape_text.strip("()").split(",") if x.strip())
        rows.append((tensor_name, shape, _DTYPES[dtype]))
    return rows


def random_state(rows, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in rows:
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g) * 0.05
            if name.endswith("running_var"):
                t = t.abs() + 0.5
        else:
            t = torch.randint(0, 5, shape, generator=g, dtype=dtype)
        state[name] = t
    return state


def _fake_lightning_classes():
    """Classes pickled under Lightning 1.3's names, as a real checkpoint references them."""
    parsing = types.ModuleType("pytorch_lightning.utilities.parsing")
    callbacks = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class AttributeDict(dict):
        pass

    class ModelCheckpoint:
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = parsing.__name__, "AttributeDict"
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = callbacks.__name__, "ModelCheckpoint"
    parsing.AttributeDict, callbacks.ModelCheckpoint = AttributeDict, ModelCheckpoint
    modules = {name: types.ModuleType(name) for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.callbacks")}
    modules.update({parsing.__name__: parsing, callbacks.__name__: callbacks})
    return modules, AttributeDict, ModelCheckpoint


def save_lightning_checkpoint(path: Path, model_state: dict[str, torch.Tensor], rl_meta=None, extra=None) -> Path:
    """torch.save a dict laid out like a Lightning 1.3 checkpoint (state under 'model.')."""
    modules, AttributeDict, ModelCheckpoint = _fake_lightning_classes()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        checkpoint = {
            "epoch": 199,
            "global_step": 4680,
            "pytorch-lightning_version": "1.3.5",
            "state_dict": {f"model.{k}": v for k, v in model_state.items()},
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": None, "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {0: {"step": 3, "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": AttributeDict(lr=0.001, name="relay"),
            **(extra or {}),
        }
        if rl_meta is not None:
            checkpoint["RL_meta"] = rl_meta
        torch.save(checkpoint, path)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return path


def reference_unet(state: dict[str, torch.Tensor], in_channels: int = 3, num_classes: int = 3):
    """relaylearn's U-Net with the original's weights put in place module by module."""
    from relaylearn.models.unet import UNetResNet18

    net = UNetResNet18(in_channels=in_channels, num_classes=num_classes)
    net.encoder.load_state_dict({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith("encoder.fc.")})
    for i, up in enumerate(net.decoder):
        prefix = f"up{i + 1}."
        up.up.load_state_dict({k[len(prefix + "up.") :]: v for k, v in state.items() if k.startswith(prefix + "up.")})
        up.conv.load_state_dict({k[len(prefix + "conv.double_conv.") :]: v for k, v in state.items() if k.startswith(prefix + "conv.double_conv.")})
    net.head.load_state_dict({"weight": state["outc.conv.weight"], "bias": state["outc.conv.bias"]})
    return net.eval()


def _read(path: Path):
    from relaylearn.assembly import strategy_from_bundle
    from relaylearn.bundle import read_bundle

    bundle = read_bundle(path, trust=None, allow_unsigned=True)
    return bundle, strategy_from_bundle(bundle)[0]


def test_solver_checkpoint_imports_and_evaluates_identically(tmp_path, capsys):
    state = random_state(listing("unet-resnet18.txt"), seed=1)
    ckpt = save_lightning_checkpoint(tmp_path / "last.ckpt", state)
    out = tmp_path / "imported.relay"
    assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "solver only" in printed and "encoder.fc" in printed
    bundle, strategy = _read(out)
    assert bundle.strategy == "sequential"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = strategy.solver.eval()(x)
        want = reference_unet(state)(x)
    assert torch.equal(got, want)
    # every tensor of the listing but the unused fc went in, values unchanged
    assert len(bundle.tensors) == 204 - 2
    assert torch.equal(bundle.tensors["solver.head.weight"], state["outc.conv.weight"])


def test_relay_checkpoint_imports_generators_and_registry(tmp_path, capsys):
    state = random_state(listing("doublegan-fundus.txt"), seed=2)
    state["merge_weight"], state["cur_stage"] = torch.tensor(5400.0), torch.tensor(2, dtype=torch.int32)  # as the original leaves them
    rl_meta = {
        "cs_previous_task": {f"Domain{i}": {"task_name": f"Domain{i}", "id": i - 1, "frequency": 1000 * i} for i in (1, 2, 3)},
        "cs_current_task": {"Domain4": {"task_name": "Domain4", "id": 3, "frequency": 4000}},
    }
    ckpt = save_lightning_checkpoint(tmp_path / "relay.ckpt", state, rl_meta=rl_meta)
    out = tmp_path / "relay.relay"
    code = main(["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "full relay" in printed.out and "G_img" in printed.out and "*_old copies" in printed.out
    assert "w_label=64" in printed.out  # the original's label generator width, set automatically
    bundle, strategy = _read(out)
    assert bundle.strategy == "relay"
    assert list(strategy.registry_previous) == ["Domain1", "Domain2", "Domain3", "Domain4"]
    assert strategy.registry_previous["Domain4"] == {"id": 3, "frequency": 4000}
    assert (strategy.merge_weight, strategy.stage) == (5400.0, 2)
    assert torch.equal(bundle.tensors["g_img.synthesis.blocks.4.to_rgb.weight"], state["G_img.synthesis.b64.torgb.weight"])
    assert torch.equal(bundle.tensors["d_img.blocks.0.from_rgb.weight"], state["D_img.b64.fromrgb.weight"])
    assert torch.equal(bundle.tensors["d_label.epilogue.fc.weight"], state["D_label.b4.fc.weight"])
    assert not any("_old" in k for k in bundle.tensors)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(strategy.solver.eval()(x), reference_unet({k[len("solver.") :]: v for k, v in state.items() if k.startswith("solver.")})(x))


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "hyper_parameters": Payload()}, ckpt)
    with pytest.raises(VerificationError, match="refused.*pickled object"):
        read_original_checkpoint(ckpt)
    assert not marker.exists()
    # the command line: one line, exit 3
    proc = subprocess.run(
        [sys.executable, "-m", "relaylearn", "import-original", str(ckpt), "-c", "others/sequential", "--out", str(tmp_path / "o.relay")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "refused" in proc.stderr
    assert not marker.exists() and not (tmp_path / "o.relay").exists()


def test_a_file_that_is_not_a_checkpoint_is_bad_input_exit_2(tmp_path, capsys):
    """Exit 3 is kept for a checkpoint with refused content (above); the wrong file is exit 2."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    listed = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], listed)
    pickled = tmp_path / "plain.pkl"
    pickled.write_bytes(pickle.dumps({"state_dict": {}}))
    folder = tmp_path / "ckpts"
    folder.mkdir()
    cases = {
        script: "not a PyTorch checkpoint (zip or pickle)",
        listed: "not a Lightning checkpoint: no 'state_dict'",
        pickled: "not a readable PyTorch checkpoint",
        folder: "is a folder; give the checkpoint file",
    }
    for path, message in cases.items():
        assert main(["import-original", str(path), "-c", "others/sequential", "--out", str(tmp_path / "o.relay")]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith(f"relaylearn: error: {path}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "o.relay").exists()


def test_wrong_shape_is_refused(tmp_path):
    state = random_state(listing("unet-resnet18.txt"))
    state["up2.conv.double_conv.0.weight"] = torch.zeros(128, 380, 3, 3)
    ckpt = save_lightning_checkpoint(tmp_path / "bad.ckpt", state)
    out = tmp_path / "bad.relay"
    with pytest.raises(UserError, match=r"decoder\.1\.conv\.0\.weight.*shape \[128, 380, 3, 3\].*\[128, 384, 3, 3\]"):
        from relaylearn.import_original import import_original

        import_original(ckpt, "others/sequential", out)
    assert not out.exists()


def test_solver_only_checkpoint_with_relay_config_is_refused(tmp_path):
    ckpt = save_lightning_checkpoint(tmp_path / "s.ckpt", random_state(listing("unet-resnet18.txt")))
    assert main(["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(tmp_path / "x.relay")]) == 2


def test_unknown_tensor_names_are_reported():
    imported = map_original_state({"model.encoder.conv1.weight": torch.zeros(1), "model.mystery.weight": torch.zeros(1)})
    from relaylearn.import_original import check_against

    with pytest.raises(UserError, match="model.mystery.weight"):
        check_against(imported, {"solver.encoder.conv1.weight": torch.zeros(1)}, "config 'x'")


def test_a_signed_import_names_its_signer_and_verifies(tmp_path, capsys):
    """With --key the imported hop is bound to the key's site (as every signed hop), so the bundle
    verifies against a trust folder holding that key."""
    from relaylearn.keys import generate_keypair

    generate_keypair(tmp_path / "keys", "Hospital-A")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "Hospital-A.pub").write_bytes((tmp_path / "keys" / "Hospital-A.pub").read_bytes())
    ckpt = save_lightning_checkpoint(tmp_path / "last.ckpt", random_state(listing("unet-resnet18.txt"), seed=3))
    out = tmp_path / "signed.relay"
    key = str(tmp_path / "keys" / "Hospital-A.key")
    assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(out), "--key", key]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--trust", str(trust)]) == 0, capsys.readouterr().err


def test_an_existing_out_file_is_not_replaced(tmp_path, capsys):
    ckpt = save_lightning_checkpoint(tmp_path / "last.ckpt", random_state(listing("unet-resnet18.txt"), seed=4))
    out = tmp_path / "signed.relay"
    out.write_bytes(b"a bundle signed earlier")
    assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"a bundle signed earlier"


def test_a_relay_checkpoint_with_an_impossible_merge_weight_is_refused_naming_the_file(tmp_path, capsys):
    state = random_state(listing("doublegan-fundus.txt"), seed=2)
    state["merge_weight"], state["cur_stage"] = torch.tensor(-1.0), torch.tensor(1, dtype=torch.int32)
    ckpt = save_lightning_checkpoint(tmp_path / "relay.ckpt", state)
    assert main(["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(tmp_path / "r.relay")]) == 2
    err = capsys.readouterr().err
    assert "relay.ckpt" in err and "merge_weight" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.relay").exists()


def _relay_state(seed: int = 2) -> dict[str, torch.Tensor]:
    state = random_state(listing("doublegan-fundus.txt"), seed=seed)
    state["merge_weight"], state["cur_stage"] = torch.tensor(5400.0), torch.tensor(2, dtype=torch.int32)
    return state


def test_a_relay_checkpoint_without_discriminators_gives_a_bundle_that_loads(tmp_path, capsys):
    state = {k: v for k, v in _relay_state().items() if not k.startswith("D_")}
    ckpt = save_lightning_checkpoint(tmp_path / "nod.ckpt", state)
    out = tmp_path / "nod.relay"
    assert main(["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(out)]) == 0, capsys.readouterr().err
    bundle, strategy = _read(out)  # as predict / test load it: the saved config says no discriminators
    assert "ship_discriminators=false" in capsys.readouterr().out
    assert bundle.manifest["config"]["strategy"]["kwargs"]["ship_discriminators"] is False
    assert not any(k.startswith("d_") for k in bundle.tensors)
    assert torch.equal(bundle.tensors["g_img.synthesis.blocks.4.to_rgb.weight"], state["G_img.synthesis.b64.torgb.weight"])


def test_discriminators_are_left_out_when_the_config_ships_none(tmp_path, capsys):
    state = _relay_state()
    ckpt = save_lightning_checkpoint(tmp_path / "relay.ckpt", state)
    out = tmp_path / "nod.relay"
    argv = ["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(out), "--set", "strategy.kwargs.ship_discriminators=false"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "discriminators (ship_discriminators is false)" in capsys.readouterr().out
    bundle, _ = _read(out)
    assert not any(k.startswith("d_") for k in bundle.tensors) and any(k.startswith("g_label.") for k in bundle.tensors)


def test_a_relay_checkpoint_with_a_non_relay_config_keeps_the_solver(tmp_path, capsys):
    state = _relay_state()
    ckpt = save_lightning_checkpoint(tmp_path / "relay.ckpt", state)
    out = tmp_path / "solver.relay"
    assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "config is not relay" in capsys.readouterr().out
    bundle, _ = _read(out)
    assert bundle.strategy == "sequential" and "w_label" not in bundle.manifest["config"]["strategy"]["kwargs"]
    assert torch.equal(bundle.tensors["solver.head.weight"], state["solver.outc.conv.weight"])


def test_a_bad_site_registry_or_scalar_is_refused_naming_the_file(tmp_path, capsys):
    state = _relay_state()
    site = {"id": 0, "frequency": 10}
    cases = [
        ({"A": site, "B": site}, {}, "two sites share an id"),
        ({"A": {"id": -1, "frequency": 10}}, {}, "id: expected an integer ≥ 0"),
        ({"A": {"id": 0, "frequency": -5}}, {}, "frequency: expected an integer ≥ 0"),
        ({"A": {"id": 0.5, "frequency": 5}}, {}, "id: expected an integer"),
        ({"A": site}, {"merge_weight": torch.tensor([1.0, 2.0])}, "'model.merge_weight' has shape [2]"),
        ({"A": site}, {"cur_stage": torch.zeros(0)}, "'model.cur_stage' has shape [0]"),
    ]
    for i, (previous, scalars, message) in enumerate(cases):
        ckpt = save_lightning_checkpoint(tmp_path / f"bad{i}.ckpt", {**state, **scalars}, rl_meta={"cs_previous_task": previous, "cs_current_task": {}})
        out = tmp_path / f"bad{i}.relay"
        assert main(["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert f"bad{i}.ckpt" in err and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_a_bad_tensor_is_refused_naming_the_file_and_its_name(tmp_path, capsys):
    state = random_state(listing("unet-resnet18.txt"), seed=6)
    bias = "outc.conv.bias"
    cases = [
        ({bias: torch.tensor([float("nan"), 0.0, 0.0])}, "'model.outc.conv.bias' ('solver.head.bias') holds NaN or infinite values"),
        ({bias: torch.tensor([float("inf"), 0.0, 0.0])}, "'model.outc.conv.bias' ('solver.head.bias') holds NaN or infinite values"),
        ({bias: torch.zeros(3, dtype=torch.complex64)}, "has dtype torch.complex64"),
        ({bias: torch.tensor([1, 2, 3])}, "has dtype torch.int64 in the checkpoint but torch.float32"),
        ({bias: torch.zeros(5)}, "'model.outc.conv.bias' ('solver.head.bias') has shape [5]"),
        ({bias: None}, "checkpoint lacks 'solver.head.bias'"),
        ({"encoder.layer9.weight": torch.zeros(3)}, "'model.encoder.layer9.weight' ('solver.encoder.layer9.weight') does not exist"),
        ({"mystery.weight": torch.zeros(3)}, "'model.mystery.weight' has no counterpart"),
    ]
    for i, (change, message) in enumerate(cases):
        changed = {k: v for k, v in {**state, **change}.items() if v is not None}
        ckpt = save_lightning_checkpoint(tmp_path / f"bad{i}.ckpt", changed)
        out = tmp_path / f"bad{i}.relay"
        assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(out)]) == 2, message
        err = capsys.readouterr().err
        assert f"bad{i}.ckpt: " in err and message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    # float → float casts are fine
    ckpt = save_lightning_checkpoint(tmp_path / "f64.ckpt", {**state, bias: state[bias].double()})
    assert main(["import-original", str(ckpt), "-c", "others/sequential", "--out", str(tmp_path / "f64.relay")]) == 0
    assert _read(tmp_path / "f64.relay")[0].tensors["solver.head.bias"].dtype == torch.float32


def test_an_import_with_equalised_spade_computes_the_same_image_generator(tmp_path, capsys):
    # the original's SPADE convolutions are plain: with spade_equalized_lr they are rescaled on import
    ckpt = save_lightning_checkpoint(tmp_path / "relay.ckpt", _relay_state())
    generated = []
    for equalized in (False, True):
        out = tmp_path / f"r{equalized}.relay"
        argv = ["import-original", str(ckpt), "-c", "fundus/relay_test", "--out", str(out)]
        argv += ["--set", "strategy.kwargs.spade_equalized_lr=true"] if equalized else []
        assert main(argv) == 0, capsys.readouterr().err
        bundle, strategy = _read(out)
        assert strategy.options.spade_equalized_lr is equalized and bundle.registry["spade_conv"] == ("equalized" if equalized else "plain")
        g = strategy.g_img.eval()
        size, n = g.synthesis.img_resolution, 2
        gen = torch.Generator().manual_seed(4)
        z = torch.randn(n, g.z_dim, generator=gen)
        c = torch.eye(g.c_dim)[:n]
        seg = torch.rand(n, g.synthesis.label_channels, size, size, generator=gen) * 2 - 1
        with torch.no_grad():
            generated.append(g(z, c, seg, noise_mode="const"))
    assert torch.allclose(generated[0], generated[1], atol=1e-5, rtol=1e-4)
