"""Exported solvers (ONNX, TorchScript) give PyTorch's logits and carry their metadata."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

from relaylearn.errors import UserError
from tests.conftest import make_bundle


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from relaylearn.predict import load_model

    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "task_1.relay")
    return load_model(bundle, no_verify=True)


def _inputs(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)) * 2 - 1


def test_onnx_matches_pytorch_for_any_batch_size(model, tmp_path):
    import onnx
    import onnxruntime as ort

    from relaylearn.export import export_model

    out = export_model(model, "onnx", tmp_path / "solver.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == ["logits"]
    for batch in (1, 3):
        x = _inputs(batch)
        with torch.no_grad():
            expected = model.solver(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 3, 32, 32)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props["img_size"]) == [32, 32]
    assert json.loads(props["bundle_sha256"]) == model.bundle_sha256
    assert json.loads(props["relaylearn"])["class_names"] == ["background", "disc_rim", "cup"]
    sidecar = json.loads((tmp_path / "solver.onnx.json").read_text())
    assert sidecar["out_range"] == [-1.0, 1.0] and sidecar["format"] == "onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solver.onnx", "solver.onnx.json"], "no temporary files left"


def test_torchscript_via_cli_matches_pytorch(model, tmp_path, monkeypatch):
    from relaylearn import export
    from relaylearn.cli import main

    monkeypatch.setattr(export, "load_model", lambda bundle, trust=None, **kwargs: model)  # the module fixture's bundle, already read
    out = tmp_path / "solver.pt"
    assert main(["export", "--bundle", "ignored.relay", "--format", "torchscript", "--out", str(out), "--no-verify"]) == 0
    extra = {"relaylearn.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["relaylearn.json"])["bundle_sha256"] == model.bundle_sha256
    for batch in (1, 4):
        x = _inputs(batch)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.solver(x), atol=1e-4, rtol=0)


def test_export_rejects_bad_requests(model, tmp_path, capsys):
    from relaylearn.cli import main
    from relaylearn.export import export_model

    with pytest.raises(UserError, match="expected one of onnx, torchscript"):
        export_model(model, "tflite", tmp_path / "x")
    with pytest.raises(UserError, match="folder"):
        export_model(model, "torchscript", tmp_path)
    assert main(["export", "--bundle", str(tmp_path / "missing.relay"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--no-verify"]) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_an_existing_out_or_sidecar_is_refused_before_the_bundle_is_read(model, tmp_path, capsys, monkeypatch):
    from relaylearn import export
    from relaylearn.cli import main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the bundle was read although --out is refused")

    monkeypatch.setattr(export, "load_model", must_not_load)
    victim = tmp_path / "site.key"
    victim.write_text("the only copy")
    args = ["export", "--bundle", "ignored.relay", "--format", "onnx", "--no-verify", "--out"]
    assert main([*args, str(victim)]) == 2
    err = capsys.readouterr().err
    assert "site.key: already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    sidecar_only = tmp_path / "m.onnx.json"
    sidecar_only.write_text("another export's metadata")
    assert main([*args, str(tmp_path / "m.onnx")]) == 2
    assert "m.onnx.json: already exists" in capsys.readouterr().err
    assert victim.read_text() == "the only copy" and sidecar_only.read_text() == "another export's metadata"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.json", "site.key"]


def test_overwrite_replaces_model_and_sidecar(model, tmp_path):
    from relaylearn.export import export_model

    out = tmp_path / "m.pt"
    out.write_text("old model")
    (tmp_path / "m.pt.json").write_text("old sidecar")
    export_model(model, "torchscript", out, overwrite=True)
    assert json.loads((tmp_path / "m.pt.json").read_text())["format"] == "torchscript" and out.read_bytes() != b"old model"


def test_a_failed_model_write_leaves_no_new_sidecar(model, tmp_path, monkeypatch):
    from relaylearn.export import export_model

    (tmp_path / "m.pt").write_text("another model")
    (tmp_path / "m.pt.json").write_text("its sidecar")
    real_fsync = os.fsync

    def disk_full_for_the_model(fd):  # the sidecar (small) fits, the model does not
        if os.fstat(fd).st_size > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_for_the_model)
    with pytest.raises(UserError, match="fresh.pt: cannot write: No space left"):
        export_model(model, "torchscript", tmp_path / "fresh.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json"], "no sidecar without its model, no temporary file"
    assert (tmp_path / "m.pt.json").read_text() == "its sidecar"


def test_a_folder_given_as_bundle_is_named_as_such(tmp_path, capsys):
    from relaylearn.cli import main

    assert main(["export", "--bundle", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--no-verify"]) == 2
    assert "is a folder, not a bundle file" in capsys.readouterr().err
