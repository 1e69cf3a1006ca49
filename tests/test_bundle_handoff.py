"""The hand-off around verification, attacked the way someone with a USB stick would: bundles
that name code, planted links, unusable or non-finite tensors, skipped hops and other relays,
impostor hops, rollbacks from another folder, unverified use and terminal escapes.

Three hospitals (keys bound to their names, one trust folder stating relay ``r1``) hand a signed
'sequential' bundle on once (one batch each); the tests then attack that relay through the CLI.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from relaylearn.bundle import read_bundle
from relaylearn.keys import load_private_key
from tests.conftest import Result, forge_bundle, only_line, run_cli, tiny_config

RELAY = "r1"


@dataclass
class Site:
    name: str
    task_id: int
    folder: Path
    config: Path
    key: Path

    def train(self, run: str, *extra) -> Result:
        return run_cli(self.folder, "train", "-c", self.config, "-n", run, "-g", "cpu", "-q", "--key", self.key, *extra)

    @property
    def ledger(self) -> Path:
        return self.key.parent / "ledger"


@dataclass
class Relay:
    root: Path
    trust: Path
    sites: list[Site]
    hops: list[Path]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, tiny_fundus) -> Relay:
    root = tmp_path_factory.mktemp("handoff")
    trust = root / "trust"
    trust.mkdir()
    (trust / "relay-id").write_text(RELAY + "\n")
    sites = []
    for task_id, name in enumerate(("Hospital-A", "Hospital-B", "Hospital-C"), start=1):
        folder = root / name
        folder.mkdir()
        assert run_cli(folder, "keygen", "keys", "--site", name).code == 0
        shutil.copy(folder / "keys" / f"{name}.pub", trust)
        config = tiny_config(folder, tiny_fundus, task_ids=(task_id,), steps=1)
        sites.append(Site(name, task_id, folder, config, folder / "keys" / f"{name}.key"))
    hops: list[Path] = []
    for site in sites:
        out = root / "usb" / f"hop{site.task_id}.relay"
        incoming = ["--in", hops[-1], "--trust", trust] if hops else ["--relay-id", RELAY]
        result = site.train("relay", *incoming, "--out", out)
        assert result.code == 0, result.err
        hops.append(out)
    return Relay(root, trust, sites, hops)


def key_of(site: Site):
    return load_private_key(site.key)


def fresh(site: Site, tmp_path: Path) -> Site:
    """``site`` on a new machine that has seen nothing of the relay yet (its key and config copied;
    a new folder, so an empty ledger): attacks are then refused by the new checks, not the ledger."""
    folder = tmp_path / f"fresh-{site.name}"
    (folder / "keys").mkdir(parents=True)
    key = folder / "keys" / site.key.name
    shutil.copy(site.key, key)
    key.chmod(0o600)
    config = folder / site.config.name
    shutil.copy(site.config, config)
    return Site(site.name, site.task_id, folder, config, key)


def hop1_tensors(relay: Relay) -> dict[str, torch.Tensor]:
    return dict(read_bundle(relay.hops[0], trust=None, allow_unsigned=True).tensors)


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def refused(relay: Relay, site: Site, bundle: Path, match: str, tmp_path: Path, *extra, code: int = 3) -> str:
    """``site`` trains from ``bundle``: the exit code, one line naming the problem, nothing written
    (no outgoing bundle, no run results, the site's ledger unchanged)."""
    before = snapshot(site.ledger)
    out = tmp_path / "refused-out.relay"
    run = f"refused-{bundle.stem}"
    result = site.train(run, "--in", bundle, "--trust", relay.trust, "--out", out, *extra)
    assert result.code == code, result.err
    line = only_line(result.err)
    assert match in line, line
    assert not out.exists()
    assert not (site.folder / "exps" / site.config.stem / run / "bundles").exists()
    assert snapshot(site.ledger) == before, "the site ledger must not move"
    return line


def test_the_relay_is_signed_bound_and_recorded(relay):
    last = read_bundle(relay.hops[-1], trust=None, allow_unsigned=True)
    assert last.manifest["relay_id"] == RELAY
    assert [h["site"] for h in last.hops] == ["Hospital-A", "Hospital-B", "Hospital-C"]
    ok = run_cli(relay.root, "verify", relay.hops[-1], "--trust", relay.trust)
    assert ok.code == 0 and f"relay {RELAY}" in ok.out
    # each site's ledger is beside its key, one file per relay and site (the site its key names)
    for site in relay.sites:
        assert [p.name for p in site.ledger.iterdir()] == [f"{RELAY}.{site.name}.json"]
        assert not (site.folder / "exps" / ".ledger").exists()


# ----- 1. nothing named by a bundle is imported or called -------------------------------------------


PROBE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from relaylearn.models.unet import UNetResNet18 as Net
from relaylearn.strategies.sequential import *  # noqa
"""


@pytest.mark.parametrize("field", ["model", "strategy"])
def test_code_named_by_a_bundle_is_never_imported(relay, tmp_path, monkeypatch, field):
    marker = tmp_path / "PWNED"
    module = f"relaylearn_probe_{field}"
    (tmp_path / f"{module}.py").write_text(PROBE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))

    def plug(manifest):
        manifest["config"][field]["name"] = f"{module}:Net"
        if field == "strategy":
            manifest["strategy"] = f"{module}:Net"

    evil = forge_bundle(relay.hops[0], tmp_path / "evil.relay", key_of(relay.sites[0]), edit=plug)
    for command, line in uses_refused(relay, evil, tmp_path):
        assert "never imported" in line
        assert not marker.exists(), f"{command} imported code named by the bundle"


def uses_refused(relay: Relay, bundle: Path, tmp_path: Path, *, formats=("torchscript",)) -> list[tuple[str, str]]:
    """``test``, ``predict`` and ``export`` (in each of ``formats``) with ``bundle``: each exits 3
    with one line and writes nothing. Returns (command, line) pairs."""
    image = tmp_path / "eye.png"
    Image.new("RGB", (40, 40), (120, 40, 20)).save(image)
    site = relay.sites[2]
    commands = [
        ["test", "-c", site.config, "-n", "probe", "-g", "cpu", "--bundle", bundle, "--trust", relay.trust],
        ["predict", "--bundle", bundle, "--trust", relay.trust, "--out", tmp_path / "pred", "-g", "cpu", image],
    ] + [["export", "--bundle", bundle, "--trust", relay.trust, "--format", f, "--out", tmp_path / f"m.{f}"] for f in formats]
    lines = []
    for command in commands:
        result = run_cli(site.folder, *command)
        assert result.code == 3, (command[0], result.err)
        lines.append((" ".join(map(str, command[:1] + command[-4:-2])), only_line(result.err)))
    assert not list(tmp_path.glob("m.*")) and not (tmp_path / "pred" / "predictions.csv").exists()
    return lines


def test_a_recipe_asking_for_huge_networks_is_refused_before_they_are_built(relay, tmp_path, monkeypatch):
    """Four GANs at the largest sizes each option allows take GBs: the networks the recipe asks for
    are measured (built on the meta device) against the bundle's tensors first, never allocated."""
    from relaylearn.strategies import relay as relay_strategy

    real_init = relay_strategy.Relay.__init__

    def measured_only(self, *args, **kwargs):
        if torch.get_default_device().type != "meta":
            pytest.fail("the bundle's networks were built in memory")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(relay_strategy.Relay, "__init__", measured_only)
    size = {"channel_base": relay_strategy.MAX_CHANNEL_BASE, "channel_max": relay_strategy.MAX_CHANNELS, "mapping_layers": relay_strategy.MAX_MAPPING_LAYERS}
    huge = {"name": "relay", "kwargs": dict.fromkeys(("g_img", "g_label", "d_img", "d_label"), size)}
    bomb = forge_bundle(
        relay.hops[0], tmp_path / "bomb.relay", key_of(relay.sites[0]), edit=lambda m: m.update(strategy="relay", config={**m["config"], "strategy": huge})
    )
    for command, line in uses_refused(relay, bomb, tmp_path):
        assert line.startswith(f"relaylearn: error: {bomb}: bundle does not fit strategy 'relay': tensor "), (command, line)


def test_a_recipe_whose_image_size_the_solver_cannot_take_is_refused(relay, tmp_path):
    def img_size(size):
        return lambda m: m["config"]["dataset"]["kwargs"].update(img_size=size)

    for size in ([48, 48], [4096, 1]):
        odd = forge_bundle(relay.hops[0], tmp_path / f"odd{size[0]}.relay", key_of(relay.sites[0]), edit=img_size(size))
        for command, line in uses_refused(relay, odd, tmp_path, formats=("torchscript", "onnx")):
            assert line.startswith(f"relaylearn: error: {odd}: the bundle's recipe does not build here: "), (command, line)
            assert f"image size {size[0]}x{size[1]} is not divisible by 32" in line, (command, line)


def test_a_plug_in_is_used_only_when_the_local_config_names_the_same_one(relay, tmp_path, monkeypatch, tiny_fundus):
    (tmp_path / "relaylearn_plug_ok.py").write_text("from relaylearn.models.unet import UNetResNet18 as Net\nclass Other(Net):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bundle = forge_bundle(relay.hops[0], tmp_path / "plug.relay", key_of(relay.sites[0]),
                    edit=lambda m: m["config"]["model"].update(name="relaylearn_plug_ok:Net"))  # fmt: skip

    def config(model: str) -> Path:
        path = tiny_config(tmp_path / model.split(":")[-1], tiny_fundus, task_ids=(1,), steps=1)
        raw = yaml.safe_load(path.read_text())
        raw["common"]["model"]["name"] = model
        path.write_text(yaml.safe_dump(raw))
        return path

    same = run_cli(tmp_path, "test", "-c", config("relaylearn_plug_ok:Net"), "-n", "p", "-g", "cpu", "--bundle", bundle, "--trust", relay.trust)
    assert same.code == 0, same.err
    other = run_cli(tmp_path, "test", "-c", config("relaylearn_plug_ok:Other"), "-n", "p", "-g", "cpu", "--bundle", bundle, "--trust", relay.trust)
    assert other.code == 3 and "never imported" in only_line(other.err)


# ----- 2. outputs never follow planted links; 8. --out is never --in -------------------------------


def test_a_link_planted_beside_out_is_not_followed(relay, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    stick = tmp_path / "usb"
    stick.mkdir()
    for name in (".hop2.relay.tmp", ".hop2.relay.tmp0"):  # the old fixed temporary names
        (stick / name).symlink_to(victim)
    site = fresh(relay.sites[1], tmp_path)
    result = site.train("link", "--in", relay.hops[0], "--trust", relay.trust, "--out", stick / "hop2.relay")
    assert result.code == 0, result.err
    assert victim.read_text() == "precious"
    assert read_bundle(stick / "hop2.relay", trust=None, allow_unsigned=True).hops[-1]["site"] == "Hospital-B"
    assert sorted(p.name for p in stick.iterdir()) == [".hop2.relay.tmp", ".hop2.relay.tmp0", "hop2.relay"]


def test_out_equal_to_in_is_refused(relay, tmp_path):
    carried = tmp_path / "carried.relay"
    shutil.copy(relay.hops[0], carried)
    before = carried.read_bytes()
    site = fresh(relay.sites[1], tmp_path)
    result = site.train("same", "--in", carried, "--trust", relay.trust, "--out", tmp_path / "." / "carried.relay")
    assert result.code == 2 and "same file as --in" in only_line(result.err)
    assert carried.read_bytes() == before
    assert not (site.folder / "exps" / site.config.stem / "same").exists()


# ----- 3. a valid but unusable bundle; 7. non-finite values ------------------------------------------


def test_a_signed_bundle_that_does_not_fit_moves_nothing_and_the_genuine_one_still_works(relay, tmp_path):
    site = fresh(relay.sites[1], tmp_path)
    tensors = hop1_tensors(relay)
    missing = sorted(tensors)[0]
    tensors.pop(missing)
    short = forge_bundle(relay.hops[0], tmp_path / "short.relay", key_of(relay.sites[0]), tensors=tensors)
    line = refused(relay, site, short, f"tensor '{missing}' is absent in the bundle", tmp_path)
    assert "does not fit strategy 'sequential'" in line
    other = forge_bundle(relay.hops[0], tmp_path / "other.relay", key_of(relay.sites[0]), edit=lambda m: m.update(strategy="relay"))
    refused(relay, site, other, "written by strategy 'relay' but this site's config uses 'sequential'", tmp_path)
    assert not site.ledger.exists()
    genuine = site.train("genuine", "--in", relay.hops[0], "--trust", relay.trust, "--out", tmp_path / "hop2.relay")
    assert genuine.code == 0, genuine.err
    assert [p.name for p in site.ledger.iterdir()] == [f"{RELAY}.{site.name}.json"]


def test_non_finite_weights_are_refused_at_load(relay, tmp_path):
    tensors = hop1_tensors(relay)
    name = next(n for n, t in sorted(tensors.items()) if t.is_floating_point() and t.numel())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    poisoned = forge_bundle(relay.hops[0], tmp_path / "nan.relay", key_of(relay.sites[0]), tensors=tensors)
    refused(relay, fresh(relay.sites[1], tmp_path), poisoned, "holds NaN or infinite values", tmp_path)


# ----- 4. hops bound to one relay and one position; 10. hops bound to their signer ------------------


def test_a_skipped_hop_is_refused_naming_expected_and_arrived(relay, tmp_path):
    line = refused(relay, fresh(relay.sites[2], tmp_path), relay.hops[0], "expects a bundle with 2 hop(s), but this one has 1", tmp_path)
    assert "writes hop 3" in line


def test_a_bundle_of_another_relay_is_refused(relay, tmp_path):
    other = forge_bundle(relay.hops[0], tmp_path / "other-relay.relay", key_of(relay.sites[0]), edit=lambda m: m.update(relay_id="other"))
    refused(relay, fresh(relay.sites[1], tmp_path), other, "belongs to relay 'other' but this site is in relay 'r1'", tmp_path)
    verify = run_cli(relay.root, "verify", other, "--trust", relay.trust)
    assert verify.code == 3 and "relay 'other'" in only_line(verify.err)


def test_a_site_must_state_its_relay(relay, tmp_path):
    trust = tmp_path / "trust"
    shutil.copytree(relay.trust, trust)
    (trust / "relay-id").unlink()
    site = fresh(relay.sites[1], tmp_path)
    result = site.train("nostate", "--in", relay.hops[0], "--trust", trust, "--out", tmp_path / "o.relay")
    assert result.code == 2 and "relay-id" in only_line(result.err)
    clash = site.train("clash", "--in", relay.hops[0], "--trust", relay.trust, "--relay-id", "r2", "--out", tmp_path / "o.relay")
    assert clash.code == 2 and "disagrees" in only_line(clash.err)


def test_a_hop_signed_by_one_site_in_the_name_of_another_is_refused(relay, tmp_path):
    impostor = forge_bundle(relay.hops[0], tmp_path / "impostor.relay", key_of(relay.sites[2]))  # C signs hop 1, which says Hospital-A
    line = refused(relay, fresh(relay.sites[1], tmp_path), impostor, "names site 'Hospital-A' but was signed by the key of site 'Hospital-C'", tmp_path)
    assert "hop 1" in line
    assert run_cli(relay.root, "verify", impostor, "--trust", relay.trust).code == 3


# ----- 5. the ledger does not depend on the working directory ---------------------------------------


def test_a_rollback_is_refused_from_any_working_directory(relay, tmp_path):
    site = relay.sites[2]  # wrote hop 3 from hop 2; hop 2 again is a rollback, whatever the folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = snapshot(site.ledger)
    result = run_cli(elsewhere, "train", "-c", site.config, "-n", "again", "-g", "cpu", "-q", "--key", site.key,
                     "--in", relay.hops[1], "--trust", relay.trust, "--out", tmp_path / "o.relay")  # fmt: skip
    assert result.code == 3 and "wrote this bundle itself" not in result.err
    assert "rollback" in only_line(result.err) and str(site.ledger) in result.err
    assert snapshot(site.ledger) == before and not (tmp_path / "o.relay").exists()
    # --ledger puts it elsewhere (a fixed place of the site's choosing): there it is empty, so accepted
    moved = run_cli(elsewhere, "train", "-c", site.config, "-n", "moved", "-g", "cpu", "-q", "--key", site.key, "--ledger", tmp_path / "ledger",
                    "--in", relay.hops[1], "--trust", relay.trust, "--out", tmp_path / "o.relay")  # fmt: skip
    assert moved.code == 0, moved.err
    assert [p.name for p in (tmp_path / "ledger").iterdir()] == [f"{RELAY}.{site.name}.json"] and snapshot(site.ledger) == before


# ----- 6. bundle text is escaped; 9. unverified use is explicit and recorded -----------------------


def test_bundle_text_reaches_the_terminal_escaped(relay, tmp_path):
    fake = "\x1b[2J\x1b[HOK: verified\x07"
    nasty = forge_bundle(relay.hops[0], tmp_path / "nasty.relay", key_of(relay.sites[0]), edit=lambda m: (
        m.update(strategy=fake), m["extra"].update({fake: fake}), m["software"].update(torch=fake)))  # fmt: skip
    shown = run_cli(relay.root, "inspect", nasty)
    assert shown.code == 0, shown.err
    assert "\x1b" not in shown.out and "\x07" not in shown.out and "\\x1b[2J" in shown.out
    line = refused(relay, fresh(relay.sites[1], tmp_path), nasty, "written by strategy", tmp_path)
    assert "\x1b" not in line and "\\x1b[2J" in line


def test_using_a_bundle_without_trust_needs_no_verify_and_is_recorded(relay, tmp_path):
    image = tmp_path / "eye.png"
    Image.new("RGB", (40, 40), (120, 40, 20)).save(image)
    site = relay.sites[2]
    bundle = relay.hops[-1]
    for command in (
        ["predict", "--bundle", bundle, "--out", tmp_path / "p0", "-g", "cpu", image],
        ["export", "--bundle", bundle, "--format", "torchscript", "--out", tmp_path / "m0.pt"],
        ["test", "-c", site.config, "-n", "relay", "-g", "cpu", "--bundle", bundle],
    ):
        result = run_cli(site.folder, *command)
        assert result.code == 2 and "--no-verify" in only_line(result.err), (command[0], result.err)
    assert not (tmp_path / "p0").exists() and not (tmp_path / "m0.pt").exists()

    for flag, verified in ((["--no-verify"], False), (["--trust", relay.trust], True)):
        tag = "v" if verified else "u"
        predicted = run_cli(site.folder, "predict", "--bundle", bundle, "--out", tmp_path / f"p{tag}", "-g", "cpu", *flag, image)
        assert predicted.code == 0, predicted.err
        info = json.loads((tmp_path / f"p{tag}" / "predictions.json").read_text())
        assert info["verified"] is verified and info["signed_by"] == ("Hospital-C" if verified else None)
        exported = run_cli(site.folder, "export", "--bundle", bundle, "--format", "torchscript", "--out", tmp_path / f"m{tag}.pt", *flag)
        assert exported.code == 0, exported.err
        assert json.loads((tmp_path / f"m{tag}.pt.json").read_text())["bundle_verified"] is verified
        tested = run_cli(site.folder, "test", "-c", site.config, "-n", f"t{tag}", "-g", "cpu", "--bundle", bundle, *flag)
        assert tested.code == 0, tested.err
        record = json.loads(next((site.folder / "exps" / site.config.stem / f"t{tag}" / "test_results").glob("results_*.json")).read_text())
        assert record["bundles"][0]["verified"] is verified and record["bundles"][0]["relay_id"] == RELAY


def test_verify_and_inspect_take_a_missing_path_as_bad_input_and_escape_the_name(relay, tmp_path):
    for command in (["verify", tmp_path / "nope.relay", "--trust", relay.trust], ["inspect", tmp_path / "nope.relay"], ["inspect", tmp_path]):
        result = run_cli(relay.root, *command)
        assert result.code == 2 and ("bundle not found" in result.err or "is a folder, not a bundle file" in result.err), result.err
    odd = tmp_path / "evil\x1b[31mRED.relay"
    odd.write_bytes(relay.hops[-1].read_bytes())
    ok = run_cli(relay.root, "verify", odd, "--trust", relay.trust)
    assert ok.code == 0 and "\x1b" not in ok.out and "evil\\x1b[31mRED.relay" in ok.out


def test_a_new_task_name_does_not_start_an_empty_ledger(relay, tmp_path):
    """The ledger belongs to the hospital (its key), not to the dataset name of one config: hop 2
    again, under another task_name, is still a rollback for the site that wrote hop 3."""
    site = relay.sites[2]
    renamed = yaml.safe_load(site.config.read_text())
    for dataset in renamed["all_tasks_datasets"]:
        dataset["kwargs"]["task_name"] += "-scanner2"
    config = tmp_path / "renamed.yaml"
    config.write_text(yaml.safe_dump(renamed))
    result = run_cli(site.folder, "train", "-c", config, "-n", "renamed", "-g", "cpu", "-q", "--key", site.key,
                     "--in", relay.hops[1], "--trust", relay.trust, "--out", tmp_path / "o.relay")  # fmt: skip
    assert result.code == 3 and "rollback" in only_line(result.err), result.err
    assert str(relay.hops[1]) in only_line(result.err), "the line names the bundle"


def test_resume_after_the_hop_was_recorded_but_not_copied_finishes_the_copy(relay, tmp_path):
    """Killed after the ledger recorded the written hop and before --out was copied: --resume
    recognises the hop as its own and copies it (the ledger is not asked again, and does not move)."""
    site = fresh(relay.sites[1], tmp_path)
    out = tmp_path / "hop2.relay"
    args = ["--in", relay.hops[0], "--trust", relay.trust, "--out", out]
    assert site.train("r", *args).code == 0
    own = site.folder / "exps" / site.config.stem / "r" / "bundles" / "task_2.relay"
    out.unlink()  # as if the process died before the copy
    before = snapshot(site.ledger)
    resumed = site.train("r", *args, "--resume")
    assert resumed.code == 0, resumed.err
    assert out.read_bytes() == own.read_bytes() and snapshot(site.ledger) == before


def test_resume_records_the_own_bundle_the_ledger_missed(relay, tmp_path):
    """Killed after the bundle was written and before the ledger recorded it: --resume records it,
    so the site still refuses its own bundle back."""
    site = fresh(relay.sites[1], tmp_path)
    args = ["--in", relay.hops[0], "--trust", relay.trust, "--out", tmp_path / "hop2.relay"]
    assert site.train("r", *args).code == 0
    (ledger,) = site.ledger.iterdir()  # back to what it held before the run wrote its hop
    state = json.loads(ledger.read_text())
    ledger.write_text(json.dumps({**state, "lineage": read_bundle(relay.hops[0], trust=None, allow_unsigned=True).lineage, "last": "received"}))
    (tmp_path / "hop2.relay").unlink()
    assert site.train("r", *args, "--resume").code == 0
    assert json.loads(ledger.read_text())["last"] == "written"
    refused(relay, site, tmp_path / "hop2.relay", "wrote this bundle itself", tmp_path, "--hop", "3")
