"""The per-hospital deploy flow through the command line: keys, signed hand-offs between four
hospitals, verification failures (exit 3, nothing written), and a site joining later.

One module-scoped relay (four hospitals, each in its own folder with its own key, config and
``exps/``) is run once and shared by the tests; each site trains 2 batches of the relay strategy
with tiny GANs.
"""

from __future__ import annotations

import json
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from relaylearn.bundle import inspect_bundle, read_bundle, write_bundle
from relaylearn.keys import generate_keypair, load_private_key
from tests.conftest import TINY, Result, only_line, run_cli, tiny_config

HOSPITALS = {  # key name -> task id; task 4 reuses Domain1's images under its own site name
    "Hospital-A": 1,
    "Hospital-B": 2,
    "Hospital-C": 3,
    "Hospital-D": 4,
}
STEPS = 2
RELAY_ID = "test-relay"


def write_config(folder: Path, data: Path, name: str, task_ids: tuple[int, ...]) -> Path:
    """A tiny relay config (conftest's) with a 4th site, training ``task_ids``, saved as ``folder/name.yaml``.

    Every site is listed in ``all_tasks_datasets`` so every hop is tested on all four test sets and
    the deploy rows can be compared with the one-machine run.
    """
    kwargs = {**TINY, "site_capacity": 6}
    raw = yaml.safe_load(tiny_config(folder, data, strategy="relay", task_ids=task_ids, steps=STEPS, strategy_kwargs=kwargs).read_text())
    raw["all_tasks_datasets"].append({"kwargs": {"task_id": 4, "task_name": "Domain4", "img_folder": "Domain1"}})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Hospital:
    name: str
    task_id: int
    folder: Path
    config: Path
    key: Path
    public: Path

    def train(self, run: str, *extra: str) -> Result:
        return run_cli(self.folder, "train", "-c", self.config, "-n", run, "-g", "cpu", "-q", "--key", self.key, *extra)

    def run_dir(self, run: str) -> Path:
        return self.folder / "exps" / self.config.stem / run


@dataclass
class Relay:
    root: Path
    data: Path
    trust: Path
    hospitals: list[Hospital]
    hops: list[Path]  # the bundle carried away from hospital k (k = 1..4)
    mimic_dir: Path


def add_hospital(root: Path, data: Path, name: str, task_id: int, trust: Path) -> Hospital:
    """A hospital's folder with its key pair (via ``relaylearn keygen``), its .pub shared to ``trust``."""
    folder = root / name
    folder.mkdir()
    result = run_cli(folder, "keygen", "keys", "--site", name)
    assert result.code == 0, result.err
    key, public = folder / "keys" / f"{name}.key", folder / "keys" / f"{name}.pub"
    shutil.copy(public, trust / public.name)
    config = write_config(folder, data, "site", (task_id,))
    return Hospital(name, task_id, folder, config, key, public)


@pytest.fixture(scope="module")
def relay(tmp_path_factory, tiny_fundus) -> Relay:
    """Four hospitals hand a signed bundle on in turn; plus the same sites mimicked on one machine."""
    root = tmp_path_factory.mktemp("relay")
    trust = root / "trust"
    trust.mkdir()
    (trust / "relay-id").write_text(RELAY_ID + "\n")  # the consortium states its relay in the trust folder
    hospitals = [add_hospital(root, tiny_fundus, name, task_id, trust) for name, task_id in HOSPITALS.items()]
    carry = root / "usb"
    hops: list[Path] = []
    for hospital in hospitals:
        out = carry / f"hop{hospital.task_id}.relay"
        incoming = ["--in", hops[-1], "--trust", trust] if hops else ["--relay-id", RELAY_ID]  # the first hospital needs no trust folder
        result = hospital.train("relay", *incoming, "--out", out)
        assert result.code == 0, result.err
        hops.append(out)

    mimic = root / "mimic"
    mimic.mkdir()
    config = write_config(mimic, tiny_fundus, "all_sites", tuple(HOSPITALS.values()))
    result = run_cli(mimic, "train", "-c", config, "-n", "mimic", "-g", "cpu", "-q")
    assert result.code == 0, result.err
    return Relay(root, tiny_fundus, trust, hospitals, hops, mimic / "exps" / "all_sites" / "mimic")


def fingerprint_of(hospital: Hospital) -> str:
    return load_private_key(hospital.key).fingerprint


# ----- the happy path ---------------------------------------------------------------------------


def test_four_hospitals_every_hop_verifies_and_the_chain_records_them(relay):
    for hop in relay.hops:
        result = run_cli(relay.root, "verify", hop, "--trust", relay.trust)
        assert result.code == 0, result.err
        assert result.out.startswith("OK:")
    result = run_cli(relay.root, "inspect", relay.hops[-1], "--json")
    assert result.code == 0, result.err
    info = json.loads(result.out)
    assert [h["site"] for h in info["hops"]] == list(HOSPITALS)  # a signed hop names its signer's site
    assert info["relay_id"] == RELAY_ID
    assert [h["signer"] for h in info["hops"]] == [fingerprint_of(h) for h in relay.hospitals]
    assert [h["order"] for h in info["hops"]] == [1, 2, 3, 4]
    # each hop names the exact file it started from
    assert [h["parent_sha256"] for h in info["hops"]] == [None] + [inspect_bundle(p)["sha256"] for p in relay.hops[:-1]]
    assert info["signed"] and info["signer"] == fingerprint_of(relay.hospitals[-1])
    assert info["registry"]["global_step"] == 4 * STEPS
    assert set(info["registry"]["site_registry"]) == {"Domain1", "Domain2", "Domain3", "Domain4"}
    # the outgoing copy (--out) is the run's own bundle, byte for byte
    for hospital, hop in zip(relay.hospitals, relay.hops):
        own = hospital.run_dir("relay") / "bundles" / f"task_{hospital.task_id}.relay"
        assert own.read_bytes() == hop.read_bytes()
        assert not list(hospital.folder.rglob("*.tmp*")) and not list(hop.parent.glob("*.tmp*"))


def test_deploy_equals_the_one_machine_mimic_exactly(relay):
    """Each hospital builds a fresh strategy from the bundle that arrived, with seed random_seed +
    task_id; the mimic run does the same from the bundle it just wrote. So the results are equal
    bit for bit (not merely close): same R rows, same weights."""
    mimic = json.loads((relay.mimic_dir / "metrics" / "matrix.json").read_text())
    deploy_rows = []
    for hospital in relay.hospitals:
        matrix = json.loads((hospital.run_dir("relay") / "metrics" / "matrix.json").read_text())
        assert matrix["sites"] == mimic["sites"] and len(matrix["R"]) == 1
        deploy_rows.append(matrix["R"][0])
    assert deploy_rows == mimic["R"]
    deployed = read_bundle(relay.hops[-1], trust=None, allow_unsigned=True).tensors
    mimicked = read_bundle(relay.mimic_dir / "bundles" / "task_4.relay", trust=None, allow_unsigned=True).tensors
    assert deployed.keys() == mimicked.keys()
    assert all((deployed[k] == mimicked[k]).all() for k in deployed)


# ----- rejections -------------------------------------------------------------------------------


def expect_rejected(relay: Relay, hospital: Hospital, bundle: Path, match: str) -> str:
    """Hospital trains with ``--in bundle``: exit 3, one line naming the problem, nothing written."""
    run = f"rejected-{bundle.stem}"
    ledger = hospital.key.parent / "ledger"
    before = {p: p.read_bytes() for p in ledger.glob("*.json")}
    out = hospital.folder / "out.relay"
    result = hospital.train(run, "--in", bundle, "--out", out, "--trust", relay.trust)
    assert result.code == 3, result.err
    line = only_line(result.err)
    assert line.startswith("relaylearn: error: ") and match in line, line
    assert not out.exists()
    bundles = hospital.run_dir(run) / "bundles"
    assert not bundles.exists() or not any(bundles.iterdir())
    assert {p: p.read_bytes() for p in ledger.glob("*.json")} == before, "the site ledger must not move"
    return line


def test_tampered_bundle_is_rejected(relay, tmp_path):
    tampered = tmp_path / "tampered.relay"
    data = bytearray(relay.hops[0].read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the weights
    tampered.write_bytes(bytes(data))
    line = expect_rejected(relay, relay.hospitals[1], tampered, "tampered.relay")
    assert "weights" in line or "CRC" in line
    result = run_cli(relay.root, "verify", tampered, "--trust", relay.trust)
    assert result.code == 3 and "tampered.relay" in only_line(result.err)


def rewrite_hop(hop, path: Path, *, site: str, parent, signing_key, config: dict | None = None, **extra) -> Path:
    """``hop``'s tensors, strategy, registry and start time (and recipe, unless ``config`` replaces it)
    written again at ``path`` as a hop of ``site`` after ``parent``, signed by ``signing_key``."""
    return write_bundle(
        path,
        hop.tensors,
        strategy=hop.strategy,
        config=hop.config if config is None else config,
        registry=hop.registry,
        site=site,
        hop_started_utc=hop.hops[-1]["started_utc"],
        parent=parent,
        signing_key=signing_key,
        **extra,
    )


def test_bundle_signed_by_a_key_outside_the_trust_folder_is_rejected(relay, tmp_path):
    generate_keypair(tmp_path / "keys", "Mallory")
    mallory = load_private_key(tmp_path / "keys" / "Mallory.key")
    hop1 = read_bundle(relay.hops[0], trust=None, allow_unsigned=True)
    forged = tmp_path / "forged.relay"
    rewrite_hop(hop1, forged, site="Domain1", parent=hop1, signing_key=mallory)
    line = expect_rejected(relay, relay.hospitals[1], forged, mallory.fingerprint)
    assert "untrusted" in line


def test_a_trusted_bundle_whose_recipe_does_not_build_here_is_rejected_before_anything_is_written(relay, tmp_path):
    """Signed by a trusted site, but its recipe asks for an augmentation this version cannot
    build: exit 3 naming the bundle, before the ledger moves or a run file is written (the
    site can still accept the genuine bundle afterwards)."""
    signer = load_private_key(relay.hospitals[0].key)
    hop1 = read_bundle(relay.hops[0], trust=None, allow_unsigned=True)
    config = json.loads(json.dumps(hop1.config))
    config["dataset"]["kwargs"]["augment"] = {"\x1b[31mbogus": 1}
    odd = tmp_path / "odd_recipe.relay"
    rewrite_hop(hop1, odd, site=signer.site, parent=None, signing_key=signer, config=config, relay_id=RELAY_ID)
    hospital = relay.hospitals[1]
    line = expect_rejected(relay, hospital, odd, "odd_recipe.relay")
    assert "recipe does not build here" in line and "\\x1b" in line
    assert not hospital.run_dir(f"rejected-{odd.stem}").exists(), "no run file written"


def test_an_unwritable_out_is_refused_before_training(relay, tmp_path):
    hospital = relay.hospitals[1]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ledger = hospital.key.parent / "ledger"
    before = {p: p.read_bytes() for p in ledger.glob("*.json")}
    result = hospital.train("unwritable-out", "--in", relay.hops[0], "--trust", relay.trust, "--out", blocker / "hop2.relay")
    assert result.code == 2, result.err
    assert "a_file" in only_line(result.err) and "writable" in result.err
    assert not hospital.run_dir("unwritable-out").exists()
    assert {p: p.read_bytes() for p in ledger.glob("*.json")} == before


def test_an_existing_out_file_is_never_overwritten(relay, tmp_path):
    hospital = relay.hospitals[1]
    kept = tmp_path / "precious.relay"
    kept.write_bytes(b"the only copy of something")
    result = hospital.train("existing-out", "--in", relay.hops[0], "--trust", relay.trust, "--out", kept)
    assert result.code == 2, result.err
    assert "already exists" in only_line(result.err)
    assert kept.read_bytes() == b"the only copy of something"
    assert not hospital.run_dir("existing-out").exists()


def test_rollback_to_an_older_bundle_is_rejected(relay):
    """Hospital C trained on hop 2 and wrote hop 3; getting hop 2 again is a rollback."""
    line = expect_rejected(relay, relay.hospitals[2], relay.hops[1], "rollback")
    assert "hop 2" in line


def unsigned_copy(relay: Relay, tmp_path: Path) -> Path:
    hop = read_bundle(relay.hops[-1], trust=None, allow_unsigned=True)
    return rewrite_hop(hop, tmp_path / "unsigned.relay", site="Domain4", parent=read_bundle(relay.hops[-2], trust=None, allow_unsigned=True), signing_key=None)


def test_unsigned_bundle_needs_insecure_unsigned(relay, tmp_path):
    unsigned = unsigned_copy(relay, tmp_path)
    line = expect_rejected(relay, relay.hospitals[0], unsigned, "unsigned")
    assert "--insecure-unsigned" in line
    result = run_cli(relay.root, "verify", unsigned, "--trust", relay.trust)
    assert result.code == 3


def test_insecure_unsigned_accepts_with_a_warning(relay, tmp_path, tiny_fundus):
    unsigned = unsigned_copy(relay, tmp_path)
    lab = tmp_path / "lab"
    lab.mkdir()
    config = write_config(lab, tiny_fundus, "lab", (1,))
    result = run_cli(
        lab, "train", "-c", config, "-n", "lab", "-g", "cpu", "-q", "--in", unsigned, "--insecure-unsigned", "--hop", "5", "--out", lab / "out.relay"
    )
    assert result.code == 0, result.err
    warnings = [line for line in result.err.splitlines() if "WARNING" in line and "privacy audit" not in line]  # a tiny run may flag a privacy check
    assert len(warnings) == 1 and "--insecure-unsigned" in warnings[0] and "unsigned.relay" in warnings[0]
    hops = read_bundle(lab / "out.relay", trust=None, allow_unsigned=True).hops
    assert len(hops) == 5 and hops[-2]["signer"] is None  # the chain shows the unsigned hop


# ----- verify, inspect, keygen --------------------------------------------------------------------


def test_verify_exit_codes(relay, tmp_path):
    ok = run_cli(relay.root, "verify", relay.hops[-1], "--trust", relay.trust)
    assert ok.code == 0 and "Hospital-A -> Hospital-B -> Hospital-C -> Hospital-D" in ok.out and RELAY_ID in ok.out
    partial_trust = tmp_path / "trust"
    partial_trust.mkdir()
    shutil.copy(relay.hospitals[0].public, partial_trust)
    bad = run_cli(relay.root, "verify", relay.hops[-1], "--trust", partial_trust)
    assert bad.code == 3 and "untrusted" in only_line(bad.err)
    missing = run_cli(relay.root, "verify", tmp_path / "nope.relay", "--trust", relay.trust)
    assert missing.code == 2 and "nope.relay" in only_line(missing.err), "a typo in a path is bad input, not a failed verification"
    no_relay_id = tmp_path / "keys_only"
    no_relay_id.mkdir()
    for hospital in relay.hospitals:
        shutil.copy(hospital.public, no_relay_id)
    unstated = run_cli(relay.root, "verify", relay.hops[-1], "--trust", no_relay_id)
    assert unstated.code == 0 and "states no relay id" in only_line(unstated.err), "the signatures verify; the relay was not checked, and it says so"


def test_an_outgoing_bundle_without_a_key_is_announced_as_unsigned(relay, tmp_path):
    hospital = relay.hospitals[1]
    result = run_cli(
        hospital.folder,
        "train",
        "-c",
        hospital.config,
        "-n",
        "nokey",
        "-g",
        "cpu",
        "-q",
        "--in",
        relay.hops[0],
        "--trust",
        relay.trust,
        "--out",
        tmp_path / "x.relay",
    )
    assert result.code == 0, result.err
    assert "WARNING: no --key" in result.err and "UNSIGNED" in result.err


def test_inspect_needs_no_trust_and_prints_the_size(relay):
    bundle = relay.hops[1]
    result = run_cli(relay.root, "inspect", bundle)
    assert result.code == 0, result.err
    size = bundle.stat().st_size
    assert f"({size:,} bytes)" in result.out
    assert "NOT checked" in result.out and fingerprint_of(relay.hospitals[1]) in result.out
    info = json.loads(run_cli(relay.root, "inspect", bundle, "--json").out)
    assert info["file_bytes"] == size and info["signature"] == "not checked"


def test_keygen_makes_a_private_0600_key_and_refuses_to_overwrite(tmp_path):
    first = run_cli(tmp_path, "keygen", "keys", "--site", "Hospital-Z")
    assert first.code == 0, first.err
    private, public = tmp_path / "keys" / "Hospital-Z.key", tmp_path / "keys" / "Hospital-Z.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert f"fingerprint (read it out to the other sites to confirm the .pub they received): {load_private_key(private).fingerprint}" in first.out.replace(
        "\n", " "
    )
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    again = run_cli(tmp_path, "keygen", "keys", "--site", "Hospital-Z")
    assert again.code == 2 and "refusing to overwrite" in only_line(again.err)
    assert private.read_bytes() == before
    bad = run_cli(tmp_path, "keygen", "keys", "--site", "bad name")
    assert bad.code == 2 and "invalid site name" in only_line(bad.err)


def test_world_readable_private_key_is_refused(relay, tmp_path):
    hospital = relay.hospitals[0]
    leaky = tmp_path / f"{hospital.name}.key"
    shutil.copy(hospital.key, leaky)
    leaky.chmod(0o644)
    result = run_cli(hospital.folder, "train", "-c", hospital.config, "-n", "leaky", "-g", "cpu", "-q", "--key", leaky)
    assert result.code == 2 and "chmod 600" in only_line(result.err)


# ----- a site joining later -----------------------------------------------------------------------


def test_new_site_joins_later_and_the_chain_records_its_signer(relay, tmp_path, tiny_fundus):
    """After hops 1-2, a new hospital (not in anyone's trust folder yet) trains from hop 2."""
    trust = tmp_path / "trust"
    shutil.copytree(relay.trust, trust)
    newcomer = add_hospital(tmp_path, tiny_fundus, "Hospital-New", 3, trust)
    old_trust = relay.trust  # what the consortium had before the newcomer's .pub was shared
    assert not (old_trust / "Hospital-New.pub").exists()
    result = newcomer.train("joined", "--in", relay.hops[1], "--out", tmp_path / "hop3-new.relay", "--trust", trust)
    assert result.code == 0, result.err
    info = json.loads(run_cli(tmp_path, "inspect", tmp_path / "hop3-new.relay", "--json").out)
    assert [h["site"] for h in info["hops"]] == ["Hospital-A", "Hospital-B", "Hospital-New"]
    assert info["hops"][-1]["signer"] == fingerprint_of(newcomer)
    assert info["hops"][:2] == json.loads(run_cli(tmp_path, "inspect", relay.hops[1], "--json").out)["hops"]
    # sites that have not added the newcomer's key refuse its bundle; once added, it verifies
    assert run_cli(tmp_path, "verify", tmp_path / "hop3-new.relay", "--trust", old_trust).code == 3
    ok = run_cli(tmp_path, "verify", tmp_path / "hop3-new.relay", "--trust", trust)
    assert ok.code == 0 and "Hospital-New" in ok.out
