"""End-to-end runs of the baselines on tiny data (seconds each)."""

import json

import pytest
import torch

from relaylearn.config import load_config
from relaylearn.errors import RelayError, UserError, VerificationError
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import tiny_config


def _run(tmp_path, data, strategy, **kw):
    cfg = load_config(str(tiny_config(tmp_path, data, strategy=strategy, **kw)))
    return run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))


def test_sequential_writes_the_run_folder(tmp_path, tiny_fundus):
    result = _run(tmp_path, tiny_fundus, "sequential")
    run = result.run_dir
    matrix = json.loads((run / "metrics" / "matrix.json").read_text())
    assert matrix["sites"] == ["Domain1", "Domain2", "Domain3"]
    assert matrix["trained"] == ["Domain1", "Domain2"]
    assert len(matrix["R"]) == 2 and all(len(r) == 3 for r in matrix["R"])
    assert all(0.0 <= v <= 1.0 for r in matrix["R"] for v in r)
    assert {"acc", "bwt", "forgetting"} <= set(matrix)
    assert sorted(p.name for p in (run / "bundles").iterdir()) == ["task_1.relay", "task_2.relay"]
    csvs = list((run / "test_results").glob("results_*.csv"))
    assert len(csvs) == 1 and len(csvs[0].read_text().splitlines()) == 1 + 2 * 3
    run_info = json.loads((run / "run.json").read_text())
    assert run_info["seed"] == 7 and "torch" in run_info["versions"]
    assert run_info["precision"] == {"1": "32", "2": "32"}, "the precision each site trained in"
    assert (run / "config.yaml").is_file() and (run / "resolved_config.yaml").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(run.rglob("*.tmp*")), "no temporary files left behind"


def test_auto_precision_says_what_it_chose(tmp_path, tiny_fundus, monkeypatch, capsys):
    from relaylearn import devices

    monkeypatch.setattr(devices, "native_bf16", lambda accelerator: False)
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", task_ids=(1,))), ["train.precision=auto"])
    result = run_training(cfg, "t", TrainOptions(exps_root=tmp_path / "exps", devices="cpu"))
    assert "precision: 32 (train.precision auto: no native bf16 kernels here)" in capsys.readouterr().err
    assert json.loads((result.run_dir / "run.json").read_text())["precision"] == {"1": "32"}


def test_cpu_training_keeps_freed_host_memory(tmp_path, tiny_fundus, monkeypatch):
    from relaylearn import devices

    calls = []
    monkeypatch.setattr(devices, "keep_freed_host_memory", lambda: calls.append(1) or True)
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="sequential", task_ids=(1,))))
    run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu"))
    assert calls, "the engine sets the allocator up for CPU training"


def test_same_seed_same_result(tmp_path, tiny_fundus):
    a = _run(tmp_path / "a", tiny_fundus, "sequential", task_ids=(1,))
    b = _run(tmp_path / "b", tiny_fundus, "sequential", task_ids=(1,))
    assert a.matrix["R"] == b.matrix["R"]


def test_local_restarts_every_site_from_the_same_weights(tmp_path, tiny_fundus):
    from relaylearn.bundle import read_bundle

    result = _run(tmp_path, tiny_fundus, "local")
    b1 = read_bundle(result.bundles[0], trust=None, allow_unsigned=True)
    b2 = read_bundle(result.bundles[1], trust=None, allow_unsigned=True)
    for name, t in b1.tensors.items():
        if name.startswith("initial."):
            assert (t == b2.tensors[name]).all()
    # site 2's model was not started from site 1's: a sequential run differs
    seq = _run(tmp_path / "seq", tiny_fundus, "sequential")
    assert seq.matrix["R"][1] != result.matrix["R"][1]


def test_joint_pools_every_site_into_one_row(tmp_path, tiny_fundus, capsys):
    result = _run(tmp_path, tiny_fundus, "joint")
    assert result.matrix["trained"] == ["Domain1+Domain2"]
    assert len(result.matrix["R"]) == 1
    assert result.matrix["bwt"] is None and result.matrix["forgetting"] is None  # pooled: nothing to forget, not a measured 0

    # `relaylearn test` of the pooled run evaluates its one bundle, with the same Dice
    import csv

    from relaylearn.evaluate import run_test

    cfg = load_config(str(tmp_path / "joint.yaml"))
    rows = list(csv.DictReader(run_test(cfg, "t", exps_root=tmp_path / "exps").open()))
    assert {r["task_id"] for r in rows} == {"1"} and [r["test_site"] for r in rows] == result.matrix["sites"]
    assert [round(float(r["dice_sample"]), 4) for r in rows] == [round(v, 4) for v in result.matrix["R"][0]]
    # a bundle given with --bundle: its rows are numbered by its hops, not by the config's first task
    given = run_test(cfg, "t", bundle=str(result.bundles[-1]), no_verify=True, exps_root=tmp_path / "exps")
    assert {r["task_id"] for r in csv.DictReader(given.open())} == {"1"}
    record = json.loads(given.with_suffix(".json").read_text())  # what a paper needs to say how it was tested
    assert (record["config"], record["test_sites"], record["bootstrap"]) == (cfg.name, result.matrix["sites"], cfg.tasks[0].test.bootstrap)
    assert record["versions"]["torch"] == torch.__version__ and record["bundles"][0]["verified"] is False
    # results that could not be written: refused before any pass, not after printing every Dice
    (tmp_path / "exps" / cfg.name / "blocked").write_text("")
    capsys.readouterr()
    with pytest.raises(UserError, match="not a writable folder"):
        run_test(cfg, "blocked", bundle=str(result.bundles[-1]), no_verify=True, exps_root=tmp_path / "exps")
    assert capsys.readouterr().out == ""


def test_existing_run_needs_resume(tmp_path, tiny_fundus):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1,))))
    first = run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    with pytest.raises(UserError, match=r"its last bundle: .*task_1\.relay.*--resume"):
        run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    again = run_training(cfg, "t", TrainOptions(quiet=True, resume=True, exps_root=tmp_path / "exps"))
    assert len(again.matrix["R"]) == 1
    assert again.matrix["per_class"] == first.matrix["per_class"] != {}, "a skipped hop keeps its per-class Dice"


def test_matrix_has_the_validation_parts(tmp_path, tiny_fundus):
    matrix = _run(tmp_path / "v", tiny_fundus, "sequential").matrix
    validation = matrix["validation"]
    assert validation["sites"] == ["Domain1", "Domain2"] and validation["trained"] == ["Domain1", "Domain2"]
    assert len(validation["R"]) == 2 and all(0.0 <= v <= 1.0 for row in validation["R"] for v in row)
    assert validation["acc"] == pytest.approx(sum(validation["R"][-1]) / 2)
    none = _run(tmp_path / "n", tiny_fundus, "sequential", task_ids=(1,), **{}).matrix
    assert none["validation"]["sites"] == ["Domain1"]
    cfg = load_config(str(tiny_config(tmp_path / "z", tiny_fundus, task_ids=(1,))), ["dataset.kwargs.val_fraction=0"])
    assert run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "z" / "exps")).matrix["validation"] is None


@pytest.mark.parametrize(
    ("broken", "overrides"),
    [("Domain3/test/ROIs/image/domain3_test_0001.png", []), ("Domain2/train/ROIs/mask/domain2_train_0004.png", ["dataset.kwargs.val_fraction=0"])],
)
def test_a_bad_file_anywhere_stops_the_run_before_training(tmp_path, tiny_fundus, monkeypatch, broken, overrides):
    """A corrupt test image of the last test site, or a corrupt mask of the second site's training
    folder, is found before the first site trains and before the run folder is written."""
    import shutil

    from relaylearn import runner
    from relaylearn.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(tiny_fundus, data)
    (data / broken).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: pytest.fail("trained before the data was checked"))
    cfg = load_config(str(tiny_config(tmp_path, data)), overrides)
    with pytest.raises(DataError) as caught:
        run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert broken.split("/")[-1] in str(caught.value)
    assert not (tmp_path / "exps").exists(), "nothing written"


def _ct_config(tmp_path, data, strategy: str = "sequential", val_fraction: float = 0.0):
    """Two synthetic CT sites (CT1, CT2) with neg_pos_ratio 1, as in configs/demo/ct_sequential."""
    import yaml

    raw = yaml.safe_load(load_config("demo/ct_sequential").path.read_text())
    raw["common"]["dataset"]["kwargs"].update({"root_path": str(data), "img_size": [32, 32], "val_fraction": val_fraction})
    raw["common"]["strategy"]["name"] = strategy
    raw["common"]["train"].update({"num_steps": 1, "batch_size": 4})
    raw["common"]["test"] = {"batch_size": 16, "bootstrap": 100}
    raw["all_tasks_datasets"] = raw["all_tasks_datasets"][:2]
    raw["current_tasks"]["task_ids"] = [1, 2]
    path = tmp_path / f"ct_{strategy}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path))


@pytest.mark.parametrize("val_fraction", [0.0, 0.15])
def test_a_site_without_foreground_to_train_on_stops_the_run_before_training(tmp_path, monkeypatch, val_fraction):
    """neg_pos_ratio needs positive slices in what a site trains on: CT2's training part has none
    (with a validation part, its only foreground lies there), found before CT1 trains."""
    import nibabel as nib
    import numpy as np

    from relaylearn import runner
    from relaylearn.assembly import load_split
    from relaylearn.data.synth_ct import write_synthetic_ct
    from relaylearn.errors import DataError

    data = tmp_path / "ct"
    write_synthetic_ct(data, size=16, seed=1, studies={"CT1": 5, "CT2": 5})
    cfg = _ct_config(tmp_path, data, val_fraction=val_fraction)
    ct2 = cfg.tasks[1].dataset
    held_out = set(load_split(ct2, "val").subjects) if val_fraction else set()
    for study in set(load_split(ct2, "train").subjects) | held_out:
        path = data / "CT2" / "label" / f"{study}.nii.gz"
        label = nib.load(str(path))
        mask = np.zeros(label.shape, np.uint8)
        mask[4:8, 4:8] = study in held_out
        nib.save(nib.Nifti1Image(mask, label.affine, label.header), str(path))
    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: pytest.fail("trained before the data was checked"))
    with pytest.raises(DataError) as caught:
        run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))
    assert str(caught.value) == "CT2: neg_pos_ratio=1 needs slices with foreground, but the training split has none"
    assert not (tmp_path / "exps").exists(), "nothing written"

    class Trained(Exception):
        pass

    def fit(*a, **k):
        raise Trained

    monkeypatch.setattr(runner, "fit_site", fit)  # pooled training: CT1's foreground is in the same batches
    with pytest.raises(Trained):
        run_training(_ct_config(tmp_path, data, "joint", val_fraction), "j", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))


def _refused_before_training(tmp_path, monkeypatch, cfg, opts: TrainOptions | None = None) -> str:
    """The ConfigError ``run_training(cfg)`` stops with: before a site trains and before anything is written."""
    from relaylearn import runner
    from relaylearn.errors import ConfigError

    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: pytest.fail("trained before the config was checked"))
    exps = tmp_path / "exps"
    with pytest.raises(ConfigError) as caught:
        run_training(cfg, "refused", opts or TrainOptions(quiet=True, exps_root=exps))
    assert caught.value.exit_code == 2 and caught.value.path == str(cfg.path), "names the config file"
    assert not (exps / cfg.name / "refused").exists(), "nothing written"
    return caught.value.message


SMALL_RELAY = {"gan_preset": "small", "g_img": {"channel_max": 16}, "d_img": {"channel_max": 16}}


@pytest.mark.parametrize(
    ("strategy", "overrides", "says"),
    [
        ("sequential", ["dataset.kwargs.img_size=[24,24]"], "common.dataset.kwargs.img_size: image size 24x24 is not divisible by 32"),
        ("sequential", ["dataset.kwargs.img_size=[40,32]"], "common.dataset.kwargs.img_size: image size 40x32 is not divisible by 32"),
        ("relay", ["dataset.kwargs.img_size=[96,96]"], "dataset.kwargs.img_size: the relay GAN needs a square power-of-two size"),
        ("sequential", ["model.kwargs.num_classes=5"], "common.model.kwargs.num_classes: 5 does not match the dataset's num_classes 3"),
        ("sequential", ["model.kwargs.pretrained_path=/nonexistent.pth"], "common.model.kwargs.pretrained_path: pretrained weights file not found"),
        ("sequential", ["model.name=resnet"], "common.model.name: unknown model 'resnet'"),
        ("sequential", ["train.batch_size=1"], "common.train.batch_size: 1 image(s) of 32x32 leave BatchNorm one value per channel"),
        ("relay", ["strategy.kwargs.site_capacity=1"], "strategy.kwargs.site_capacity: site 'Domain2' would be site number 2"),
    ],
)
def test_a_config_the_networks_cannot_take_stops_the_run_before_anything_is_written(tmp_path, tiny_fundus, monkeypatch, strategy, overrides, says):
    """Each site config's solver, strategy and loss are built, and a batch of zeros run through the
    solver, before the run folder is written: an image size, batch size, model option or site
    capacity the networks cannot take is one ConfigError naming the config and the key (a
    site_capacity too small for the run's sites was refused only when the site past it started,
    after the earlier sites trained)."""
    kwargs = SMALL_RELAY if strategy == "relay" else None
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy=strategy, strategy_kwargs=kwargs)), overrides)
    assert _refused_before_training(tmp_path, monkeypatch, cfg).startswith(says)


def test_batch_size_one_is_fine_where_the_bottleneck_has_pixels(tmp_path, tiny_fundus, monkeypatch):
    from relaylearn import runner

    class Trained(Exception):
        pass

    def fit(*a, **k):
        raise Trained

    monkeypatch.setattr(runner, "fit_site", fit)
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1,), img=64)), ["train.batch_size=1"])  # a 2x2 bottleneck
    with pytest.raises(Trained):
        run_training(cfg, "t", TrainOptions(quiet=True, exps_root=tmp_path / "exps"))


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ({"test_site": {"num_classes": 4}}, "all_tasks_datasets[2].kwargs.num_classes: test site Domain3 has 4 but the model is trained with 3"),
        ({"test_site": {"channels": 1}}, "all_tasks_datasets[2].kwargs.channels: test site Domain3 has 1 but the model is trained with 3"),
        ({"task_conf": {"channels": 1}}, "current_tasks.task_confs.2.dataset.kwargs.channels: site Domain2 has 1 but site Domain1 has 3"),
        ({"task_conf": {"num_classes": 2}}, "current_tasks.task_confs.2.dataset.kwargs.num_classes: site Domain2 has 2 but site Domain1 has 3"),
    ],
)
def test_sites_of_a_run_share_classes_and_channels(tmp_path, tiny_fundus, monkeypatch, where, says):
    """A test site with other classes was scored silently (a class the model cannot predict counts
    Dice 1.0); a training site with other channels crashed at the first site's validation."""
    import yaml

    path = tiny_config(tmp_path, tiny_fundus)
    raw = yaml.safe_load(path.read_text())
    if "test_site" in where:
        raw["all_tasks_datasets"][2]["kwargs"].update(where["test_site"])
    else:
        raw["current_tasks"]["task_confs"] = {2: {"dataset": {"kwargs": where["task_conf"]}}}
    path.write_text(yaml.safe_dump(raw))
    assert _refused_before_training(tmp_path, monkeypatch, load_config(str(path))).startswith(says)


def test_a_bundle_whose_relay_is_full_is_refused_before_anything_is_written(tmp_path, tiny_fundus, monkeypatch):
    """With --in, the sites already in the incoming bundle's registry count against the site capacity."""
    kwargs = {**SMALL_RELAY, "site_capacity": 1}
    first_hop = _first_hop(tmp_path, tiny_fundus, "relay", kwargs)
    cfg = load_config(str(tiny_config(tmp_path / "b", tiny_fundus, strategy="relay", task_ids=(2,), steps=1, strategy_kwargs=kwargs)))
    opts = TrainOptions(quiet=True, exps_root=tmp_path / "exps", in_bundle=str(first_hop), insecure_unsigned=True)
    says = _refused_before_training(tmp_path, monkeypatch, cfg, opts)
    assert says.startswith("strategy.kwargs.site_capacity: site 'Domain2' would be site number 2")


def _first_hop(tmp_path, data, strategy="sequential", strategy_kwargs=None):
    """The (unsigned) bundle of a one-step run of site 1 with ``strategy``."""
    cfg = load_config(
        str(tiny_config(tmp_path / "a", data, strategy=strategy, task_ids=(1,), steps=1, strategy_kwargs=strategy_kwargs)), ["audit.after_each_hop=false"]
    )
    return run_training(cfg, "first", TrainOptions(quiet=True, exps_root=tmp_path / "exps")).bundles[0]


def _second_hop_refused(tmp_path, data, monkeypatch, incoming):
    """The error ``train --in incoming --insecure-unsigned`` (site 2, sequential) stops with before training."""
    from relaylearn import runner

    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: pytest.fail("trained on a bundle that should have been refused"))
    cfg = load_config(str(tiny_config(tmp_path / "b", data, strategy="sequential", task_ids=(2,), steps=1)))
    opts = TrainOptions(quiet=True, exps_root=tmp_path / "exps", in_bundle=str(incoming), insecure_unsigned=True)
    with pytest.raises(RelayError) as caught:
        run_training(cfg, "second", opts)
    assert not (tmp_path / "exps" / cfg.name / "second" / "checkpoints").exists()
    return caught.value


def test_a_manifest_without_room_for_one_more_hop_is_refused_before_training(tmp_path, tiny_fundus, monkeypatch):
    """A manifest just under the size limit verifies, but the next hop's could not be written: the
    hop would train in full and then fail writing its own bundle."""
    from relaylearn.bundle import MAX_MANIFEST_BYTES, read_bundle, write_bundle

    first = read_bundle(_first_hop(tmp_path, tiny_fundus), trust=None, allow_unsigned=True)
    padded = tmp_path / "padded.relay"
    hop = first.hops[-1]
    write_bundle(
        padded, first.tensors, strategy=first.strategy, config=first.config, registry=first.registry, site=hop["site"],
        hop_started_utc=hop["started_utc"], finished_utc=hop["finished_utc"], parent=None, signing_key=None, extra={"pad": "x" * (MAX_MANIFEST_BYTES - 40_000)},
    )  # fmt: skip
    refused = _second_hop_refused(tmp_path, tiny_fundus, monkeypatch, padded)
    assert isinstance(refused, VerificationError) and refused.path == str(padded)
    assert "leaves no room for the next hop" in refused.message


def test_an_unwritable_ledger_folder_is_refused_before_training(tmp_path, tiny_fundus, monkeypatch):
    from relaylearn import runner
    from relaylearn.keys import generate_keypair

    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: pytest.fail("trained although the ledger cannot be written"))
    key, _ = generate_keypair(tmp_path / "keys", "HospA")
    (tmp_path / "a_file").write_text("not a folder")
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1,))))
    opts = TrainOptions(
        quiet=True, exps_root=tmp_path / "exps", key=str(key), ledger=str(tmp_path / "a_file" / "ledger"), out_bundle=str(tmp_path / "hop1.relay")
    )
    with pytest.raises(UserError, match="site ledger: cannot write here: .*a_file is not a writable folder") as refused:
        run_training(cfg, "t", opts)
    assert refused.value.path == str(tmp_path / "a_file" / "ledger")
    assert not (tmp_path / "exps").exists() and not (tmp_path / "hop1.relay").exists()


def test_a_ledger_that_fails_after_training_says_resume_and_resume_finishes(tmp_path, tiny_fundus, monkeypatch):
    from relaylearn.bundle import SiteLedger
    from relaylearn.keys import generate_keypair

    key, _ = generate_keypair(tmp_path / "keys", "HospA")
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=1)))
    out = tmp_path / "hop1.relay"
    opts = {"quiet": True, "exps_root": tmp_path / "exps", "key": str(key), "out_bundle": str(out)}
    real_record = SiteLedger.record

    def disk_gone(self, bundle, written=False):
        raise UserError("cannot write: Read-only file system", self.path)

    monkeypatch.setattr(SiteLedger, "record", disk_gone)
    with pytest.raises(UserError, match=r"Read-only file system; this site's bundle .*task_1\.relay is kept: .*--resume"):
        run_training(cfg, "t", TrainOptions(**opts))
    assert not out.exists()
    monkeypatch.setattr(SiteLedger, "record", real_record)
    run_training(cfg, "t", TrainOptions(**opts, resume=True))
    assert out.is_file() and len(list((tmp_path / "keys" / "ledger").glob("*.HospA.json"))) == 1


def test_the_insecure_unsigned_warning_escapes_the_bundle_file_name(tmp_path, tiny_fundus, monkeypatch, capsys):
    """A bundle's file name comes from whoever sent it: an escape sequence in it never reaches the terminal."""
    import shutil

    from relaylearn import runner

    class Trained(Exception):
        pass

    incoming = shutil.copy(_first_hop(tmp_path, tiny_fundus), tmp_path / "hop1\x1b]0;PWN\x07\x1b[31m.relay")
    capsys.readouterr()
    monkeypatch.setattr(runner, "fit_site", lambda *a, **k: (_ for _ in ()).throw(Trained()))
    cfg = load_config(str(tiny_config(tmp_path / "b", tiny_fundus, strategy="sequential", task_ids=(2,), steps=1)))
    with pytest.raises(Trained):
        run_training(cfg, "second", TrainOptions(quiet=True, exps_root=tmp_path / "exps", in_bundle=str(incoming), insecure_unsigned=True))
    err = capsys.readouterr().err
    assert "WARNING: --insecure-unsigned:" in err and "hop1\\x1b]0;PWN\\x07\\x1b[31m.relay" in err
    assert "\x1b" not in err and "\x07" not in err
