"""A tiny CT relay end to end: synthetic CT volumes, study-wise split, one channel, 2 classes,
negatives re-drawn every epoch, replay GAN on 1-channel slices, a bundle per site."""

from __future__ import annotations

import json

import numpy as np
import yaml
from PIL import Image

from relaylearn.assembly import strategy_from_bundle
from relaylearn.bundle import read_bundle
from relaylearn.cli import main
from relaylearn.config import load_config
from relaylearn.data.ct import window_hu
from relaylearn.data.synth_ct import write_synthetic_ct
from relaylearn.predict import load_model, read_image
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import TINY


def test_tiny_ct_relay_trains_end_to_end(tmp_path, monkeypatch):
    data = tmp_path / "ct"
    write_synthetic_ct(data, size=32, seed=3, studies={"CT1": 3, "CT2": 3})
    raw = yaml.safe_load((load_config("demo/ct_relay").path).read_text())
    # 3 studies per site: 2 train, 1 test, none spared for a validation part
    raw["common"]["dataset"]["kwargs"].update({"root_path": str(data), "train_ratio": 0.67, "val_fraction": 0})
    raw["common"]["strategy"]["kwargs"] = dict(TINY)
    raw["common"]["train"].update({"num_steps": 2, "batch_size": 4})
    raw["common"]["test"] = {"batch_size": 16, "bootstrap": 100}
    raw["all_tasks_datasets"] = raw["all_tasks_datasets"][:2]
    raw["current_tasks"]["task_ids"] = [1, 2]
    config = tmp_path / "ct_relay.yaml"
    config.write_text(yaml.safe_dump(raw))

    result = run_training(load_config(str(config)), "tiny", TrainOptions(devices="cpu", quiet=True, exps_root=tmp_path / "exps"))
    matrix = json.loads((result.run_dir / "metrics" / "matrix.json").read_text())
    assert matrix["sites"] == ["CT1", "CT2"] and len(matrix["R"]) == 2
    assert all(0.0 <= v <= 1.0 for row in matrix["R"] for v in row)
    bundle = read_bundle(result.bundles[-1], trust=None, allow_unsigned=True)
    assert [h["site"] for h in bundle.hops] == ["CT1", "CT2"]
    assert bundle.tensors["solver.encoder.conv1.weight"].shape[1] == 1  # one input channel
    assert bundle.tensors["solver.head.weight"].shape[0] == 2  # background, tumour
    strategy, task = strategy_from_bundle(bundle)
    assert task.dataset.name == "ct_nifti" and sorted(strategy.registry_previous) == ["CT1", "CT2"]
    images, labels = strategy.previews(2)["CT1"]
    assert images.shape == (2, 1, 32, 32) and int(labels.max()) <= 1

    # predict on 16-bit PNG slices (HU − hu_min): the HU window of training is applied
    slices = tmp_path / "png"
    write_synthetic_ct(slices, size=32, seed=3, studies={"CT1": 3}, layout="slices")
    files = sorted(p for p in next(d for d in (slices / "CT1").iterdir() if d.is_dir()).glob("[0-9]*.png"))[:3]
    model = load_model(result.bundles[-1], no_verify=True)
    assert model.hu == (-160.0, -160.0, 240.0)
    grey = read_image(files[0], 1, model.hu)[:, :, 0]
    assert np.array_equal(grey, window_hu(np.asarray(Image.open(files[0]), dtype=np.float32) - 160.0, (-160, 240))), "as training windows it"
    assert main(["predict", "--no-verify", "--bundle", str(result.bundles[-1]), "--out", str(tmp_path / "pred"), *map(str, files)]) == 0
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert len(masks) == 3 and max(int(np.asarray(Image.open(m)).max()) for m in masks) <= 1

    # a site whose slices store HU + 1024 says so in its local config (-c); the bundle's hu_min is the training site's
    from relaylearn import predict

    seen = []
    monkeypatch.setattr(predict, "read_image", lambda path, channels, hu=None: seen.append(hu) or read_image(path, channels, hu))
    local = tmp_path / "local.yaml"
    local.write_text(
        yaml.safe_dump(
            {**raw, "common": {**raw["common"], "dataset": {**raw["common"]["dataset"], "kwargs": {**raw["common"]["dataset"]["kwargs"], "hu_min": -1024}}}}
        )
    )
    argv = ["predict", "--no-verify", "--bundle", str(result.bundles[-1]), "--out", str(tmp_path / "pred"), *map(str, files)]
    assert main([*argv, "-c", str(local), "--overwrite"]) == 0
    assert seen and set(seen) == {(-1024.0, -160.0, 240.0)}

    # the exported model's metadata states the HU window
    assert main(["export", "--no-verify", "--bundle", str(result.bundles[-1]), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["hu_window"] == [-160.0, 240.0] and "window [-160, 240]" in meta["input"]["preprocessing"]


def test_a_ct_run_scores_the_tumour_only_and_names_each_slice_study(tmp_path, monkeypatch):
    """With add_bg_label (class 1 = soft tissue, class 2 = tumour) R, per_class, the validation
    matrix and the CSVs score class 2 only; per_image CSV rows carry their study."""
    import csv

    from relaylearn import metrics

    data = tmp_path / "ct"
    write_synthetic_ct(data, size=32, seed=3, studies={"CT1": 5, "CT2": 5})
    overrides = ["dataset.kwargs.add_bg_label=true", "dataset.kwargs.num_classes=3", "train.loss.kwargs.ce_weight=[1,1,2]", "train.num_steps=1"]
    overrides += [
        "train.batch_size=4",
        "dataset.kwargs.train_ratio=0.6",
        "dataset.kwargs.val_fraction=0.34",
        "dataset.kwargs.neg_pos_ratio=null",
        "test.bootstrap=100",
    ]
    raw = yaml.safe_load((load_config("demo/ct_sequential").path).read_text())
    raw["all_tasks_datasets"], raw["current_tasks"]["task_ids"] = raw["all_tasks_datasets"][:2], [1, 2]
    config = tmp_path / "ct_seq.yaml"
    config.write_text(yaml.safe_dump(raw))
    scored = []
    dice_per_image = metrics.dice_per_image
    monkeypatch.setattr(metrics, "dice_per_image", lambda *a, **k: scored.append(a[3:]) or dice_per_image(*a, **k))  # the validation row's
    result = run_training(load_config(str(config), overrides, str(data)), "t", TrainOptions(devices="cpu", quiet=True, exps_root=tmp_path / "exps"))
    matrix = json.loads((result.run_dir / "metrics" / "matrix.json").read_text())
    assert {key for row in matrix["per_class"].values() for cell in row.values() for key in cell} == {"dice_class_2"}
    assert matrix["validation"] is not None and scored and set(scored) == {(2,)}
    folder = result.run_dir / "test_results"
    rows = list(csv.DictReader(next(folder.glob("per_image_*.csv")).open()))
    ct1 = [r for r in rows if r["test_site"] == "CT1" and r["task_id"] == "1"]
    assert all(r["name"].startswith(r["subject"] + "_") for r in rows) and len({r["subject"] for r in ct1}) == 2 < len(ct1)
    summary = list(csv.DictReader(next(folder.glob("results_*.csv")).open()))
    assert {r["n_subjects"] for r in summary} == {"2"} and "dice_class_1" not in summary[0]
