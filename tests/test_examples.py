"""The README's 'adding your own model / strategy' examples run as written."""

from relaylearn.config import load_config
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import tiny_config


def test_custom_strategy_and_model_from_the_readme(tmp_path, tiny_fundus):
    path = tiny_config(tmp_path, tiny_fundus, strategy="examples.anchor_strategy:AnchoredFineTuning", strategy_kwargs={"strength": 0.01})
    text = path.read_text().replace("name: unet", "name: examples.tiny_net:TinyNet")
    path.write_text(text)
    cfg = load_config(str(path))
    result = run_training(cfg, "custom", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert len(result.matrix["R"]) == 2
    from relaylearn.bundle import read_bundle

    bundle = read_bundle(result.bundles[-1], trust=None, allow_unsigned=True)
    assert bundle.manifest["strategy"] == "examples.anchor_strategy:AnchoredFineTuning"
    assert any(k.startswith("solver.body.") for k in bundle.tensors)


def _binary_lesion_sites(root, sites=("North", "South"), n=6, size=24, seed=0):
    """Tiny sites in the layout of examples/binary_layout.py: a bright disc is the lesion."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for site in sites:
        for split in ("train", "test"):
            (root / site / split / "scans").mkdir(parents=True)
            (root / site / split / "lesions").mkdir(parents=True)
            for i in range(n):
                cy, cx, r = rng.integers(6, size - 6, 2).tolist() + [int(rng.integers(3, 6))]
                lesion = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                scan = (rng.normal(60, 10, (size, size)) + 120 * lesion).clip(0, 255).astype(np.uint8)
                Image.fromarray(scan).save(root / site / split / "scans" / f"s{i}.png")
                Image.fromarray(lesion.astype(np.uint8) * 255).save(root / site / split / "lesions" / f"s{i}_mask.png")


def test_custom_data_layout_from_the_readme_trains_and_predicts(tmp_path):
    """examples/binary_layout.py is the whole of a new dataset: train two sites on it, and
    ``predict`` writes masks in its encoding; a bundle alone never makes relaylearn import it."""
    import numpy as np
    import pytest
    import yaml
    from PIL import Image

    from relaylearn.assembly import load_model, load_split
    from relaylearn.errors import VerificationError
    from relaylearn.predict import predict_images

    _binary_lesion_sites(tmp_path / "data")
    layout = "examples.binary_layout:BinaryLesionLayout"
    cfg = {
        "common": {
            "random_seed": 1,
            "dataset": {
                "name": layout,
                "kwargs": {"root_path": str(tmp_path / "data"), "img_size": [32, 32], "num_classes": 2, "channels": 1, "val_fraction": 0},
            },
            "strategy": {"name": "sequential"},
            "model": {"name": "unet"},
            "train": {"num_steps": 1, "batch_size": 4, "log_every_n_steps": 1, "loss": {"kwargs": {"ce_weight": [1.0, 2.0]}}},
            "test": {"batch_size": 8, "bootstrap": 100},
        },
        "all_tasks_datasets": [{"kwargs": {"task_id": 1, "task_name": "North"}}, {"kwargs": {"task_id": 2, "task_name": "South"}}],
        "current_tasks": {"task_ids": [1, 2]},
    }
    path = tmp_path / "lesions.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load_config(str(path))
    data = load_split(config.tasks[0].dataset, "train")
    assert tuple(data.images.shape) == (6, 1, 32, 32) and set(data.labels.unique().tolist()) == {0, 1}
    result = run_training(config, "custom-layout", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert len(result.matrix["R"]) == 2
    with pytest.raises(VerificationError, match="plug-in data layout"):
        load_model(result.bundles[-1], no_verify=True)  # the bundle names the layout; no local config does
    model = load_model(result.bundles[-1], no_verify=True, plugins={layout})
    assert model.class_names == ("background", "lesion")
    csv_path = predict_images(model, [tmp_path / "data" / "North" / "test" / "scans" / "s0.png"], tmp_path / "pred")
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / "s0.png"))
    assert mask.shape == (24, 24) and set(np.unique(mask).tolist()) <= {0, 255}
    assert "area_px_lesion" in csv_path.read_text().splitlines()[0]
