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
