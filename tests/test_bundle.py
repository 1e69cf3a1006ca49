"""The relay bundle: round trip, determinism, every container/manifest/weights check, ledger, inspect."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

from relaylearn import bundle as bundle_module
from relaylearn.bundle import (
    MANIFEST_NAME,
    MEMBER_NAMES,
    SIGNATURE_NAME,
    UNSIGNED_MARKER,
    WEIGHTS_NAME,
    SiteLedger,
    _dump_manifest,
    atomic_write,
    format_inspect,
    inspect_bundle,
    read_bundle,
    verify_bundle,
    write_bundle,
)
from relaylearn.errors import RelayError, UserError, VerificationError
from relaylearn.keys import generate_keypair, load_private_key, load_trust_dir
from tests.conftest import container_bytes, forge_bundle

STARTED = "2024-05-01T08:00:00Z"
FINISHED = "2024-05-01T09:30:00Z"


@pytest.fixture
def keys(tmp_path):
    """Two sites whose public keys are trusted, and one outsider whose key is not."""
    trusted_dir, outsider_dir = tmp_path / "trusted", tmp_path / "outsider"
    site_a = load_private_key(generate_keypair(trusted_dir, "SiteA")[0])
    site_b = load_private_key(generate_keypair(trusted_dir, "SiteB")[0])
    outsider = load_private_key(generate_keypair(outsider_dir, "Mallory")[0])
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    for site in ("SiteA", "SiteB"):
        (trust_dir / f"{site}.pub").write_bytes((trusted_dir / f"{site}.pub").read_bytes())
    return {"a": site_a, "b": site_b, "outsider": outsider, "trust": load_trust_dir(trust_dir)}


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "solver.conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
        "solver.conv.bias": torch.randn(4, generator=gen).half(),
        "solver.bn.num_batches_tracked": torch.tensor(7),
        "solver.transposed": torch.randn(3, 5, generator=gen, dtype=torch.float64).t(),  # not contiguous
        "gen.w_avg": torch.randn(6, generator=gen).bfloat16(),
        "gen.mask": torch.tensor([True, False, True]),
        "disc.empty": torch.zeros(0, 2, dtype=torch.uint8),
    }


def write(path, key, *, parent=None, site=None, tensors=None, **overrides):
    kwargs = dict(
        strategy="relay",
        config={"train": {"lr": 1e-4, "epochs": 2}, "note": "ünïcode"},
        registry={"sites": {"SiteA": {"id": 0}}},
        site=site or (key.site if key else "SiteA"),
        hop_started_utc=STARTED,
        parent=parent,
        signing_key=key,
        finished_utc=FINISHED,
    )
    kwargs.update(overrides)
    return write_bundle(path, sample_tensors() if tensors is None else tensors, **kwargs)


def members_of(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def save_container(path, members: list[tuple[str, bytes]]) -> Path:
    Path(path).write_bytes(container_bytes(members))
    return Path(path)


def save_members(path, manifest: bytes, weights: bytes, signature: bytes) -> Path:
    """A canonical container holding exactly these three members."""
    return save_container(path, [(MANIFEST_NAME, manifest), (WEIGHTS_NAME, weights), (SIGNATURE_NAME, signature)])


def rejects(path, match, **kwargs):
    kwargs.setdefault("trust", None)
    with pytest.raises(VerificationError, match=match or None) as info:
        read_bundle(path, **kwargs)
    assert info.value.exit_code == 3
    assert "\n" not in str(info.value)
    return info.value


# ----- round trip and format ----------------------------------------------------------------


def test_round_trip_is_bit_identical_and_manifest_complete(tmp_path, keys):
    path = write(tmp_path / "b1.relay", keys["a"], extra={"train_images": 50})
    bundle = read_bundle(path, trust=keys["trust"])
    originals = sample_tensors()
    assert set(bundle.tensors) == set(originals)
    for name, original in originals.items():
        loaded = bundle.tensors[name]
        assert loaded.dtype == original.dtype and loaded.shape == original.shape
        assert loaded.is_contiguous()
        assert torch.equal(loaded.reshape(-1).view(torch.uint8), original.contiguous().reshape(-1).view(torch.uint8))

    manifest = bundle.manifest
    assert manifest["format"] == "relaylearn-bundle" and manifest["format_version"] == 1 and manifest["signed"] is True
    assert manifest["software"]["torch"] == torch.__version__
    assert manifest["strategy"] == "relay"
    assert manifest["config"] == {"train": {"lr": 1e-4, "epochs": 2}, "note": "ünïcode"}
    assert manifest["registry"] == {"sites": {"SiteA": {"id": 0}}}
    assert manifest["extra"] == {"train_images": 50}
    assert manifest["tensors"]["solver.transposed"] == {"dtype": "float64", "shape": [5, 3]}
    assert manifest["tensors"]["solver.bn.num_batches_tracked"] == {"dtype": "int64", "shape": []}
    weights = members_of(path)[WEIGHTS_NAME]
    assert manifest["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["weights_bytes"] == len(weights)
    assert manifest["hops"] == [{
        "site": "SiteA", "order": 1, "started_utc": STARTED, "finished_utc": FINISHED,
        "signer": keys["a"].fingerprint, "parent_sha256": None,
    }]  # fmt: skip
    assert bundle.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bundle.signed_by == "SiteA" and bundle.signer_fingerprint == keys["a"].fingerprint
    assert bundle.lineage == [bundle.sha256]


def test_pooled_hop_site_names_may_join_sites_with_plus(tmp_path, keys):
    bundle = read_bundle(write(tmp_path / "j.relay", keys["a"], site="Domain1+Domain2"), trust=keys["trust"])
    assert bundle.hops[-1]["site"] == "Domain1+Domain2"


def test_next_hop_extends_the_chain(tmp_path, keys):
    first = read_bundle(write(tmp_path / "b1.relay", keys["a"]), trust=keys["trust"])
    second = read_bundle(write(tmp_path / "b2.relay", keys["b"], parent=first), trust=keys["trust"])
    assert [h["order"] for h in second.hops] == [1, 2]
    assert second.hops[0] == first.hops[0]
    assert second.hops[1]["site"] == "SiteB" and second.hops[1]["parent_sha256"] == first.sha256
    assert second.signed_by == "SiteB"
    assert second.lineage == [first.sha256, second.sha256]
    again = read_bundle(tmp_path / "b2.relay", trust=keys["trust"], expect_parent_sha256=first.sha256)
    assert again.sha256 == second.sha256
    rejects(tmp_path / "b2.relay", "expected parent", trust=keys["trust"], expect_parent_sha256="0" * 64)


@pytest.mark.parametrize("signed", [True, False])
def test_identical_inputs_give_identical_bytes(tmp_path, keys, signed):
    key = keys["a"] if signed else None
    one = write(tmp_path / "one.relay", key).read_bytes()
    two = write(tmp_path / "two.relay", key).read_bytes()
    assert one == two


def test_container_is_a_plain_stored_zip_readable_by_standard_tools(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == list(MEMBER_NAMES)
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
        manifest_bytes, signature = archive.read(MANIFEST_NAME), archive.read(SIGNATURE_NAME)
    keys["a"].public_key.verify(signature, manifest_bytes)  # signature is over the exact manifest bytes
    assert manifest_bytes.isascii() and manifest_bytes.endswith(b"\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_unsigned_bundles_only_with_allow_unsigned(tmp_path, keys):
    path = write(tmp_path / "u.relay", None, site="SimSite")
    assert members_of(path)[SIGNATURE_NAME] == UNSIGNED_MARKER == b"UNSIGNED"
    rejects(path, "unsigned", trust=keys["trust"])
    rejects(path, "unsigned", trust=None)
    with pytest.raises(VerificationError, match="unsigned"):
        verify_bundle(path, keys["trust"])
    bundle = read_bundle(path, trust=None, allow_unsigned=True)
    assert bundle.signed_by is None and bundle.manifest["signed"] is False and bundle.hops[-1]["signer"] is None


def test_signed_bundle_without_trust(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    rejects(path, "no trusted keys were given")
    assert read_bundle(path, trust=None, allow_unsigned=True).signed_by is None  # accepted, but not authenticated
    assert verify_bundle(path, keys["trust"]).signed_by == "SiteA"


# ----- signatures -----------------------------------------------------------------------------


def test_bundle_signed_by_unknown_key_is_rejected(tmp_path, keys):
    path = write(tmp_path / "m.relay", keys["outsider"])
    error = rejects(path, "untrusted key", trust=keys["trust"])
    assert keys["outsider"].fingerprint in str(error)
    rejects(path, "untrusted key", trust=keys["trust"], allow_unsigned=True)  # allow_unsigned is no way around it


def test_valid_bundle_resigned_by_unknown_key_is_rejected(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    parts = members_of(path)
    forged = keys["outsider"].sign(parts[MANIFEST_NAME])
    save_members(tmp_path / "resigned.relay", parts[MANIFEST_NAME], parts[WEIGHTS_NAME], forged)
    rejects(tmp_path / "resigned.relay", "does not verify with any trusted key", trust=keys["trust"])
    forge_bundle(path, tmp_path / "edited.relay", keys["outsider"], edit=lambda m: m["config"].update(lr=1.0))
    rejects(tmp_path / "edited.relay", "untrusted key", trust=keys["trust"])


def test_manifest_edited_after_signing_is_rejected(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    parts = members_of(path)
    edited = parts[MANIFEST_NAME].replace(b'"epochs": 2', b'"epochs": 9')
    assert edited != parts[MANIFEST_NAME]
    save_members(tmp_path / "e.relay", edited, parts[WEIGHTS_NAME], parts[SIGNATURE_NAME])
    rejects(tmp_path / "e.relay", "does not verify", trust=keys["trust"])


def test_last_hop_must_name_the_real_signer(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    forge_bundle(path, tmp_path / "f.relay", keys["a"], edit=lambda m: m["hops"][-1].update(signer=keys["b"].fingerprint))
    rejects(tmp_path / "f.relay", "last hop names signer", trust=keys["trust"])


def test_signed_flag_must_match_the_signature_member(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    forge_bundle(path, tmp_path / "f.relay", keys["a"], edit=lambda m: m.update(signed=False))
    rejects(tmp_path / "f.relay", "says unsigned but the last hop names a signer", trust=keys["trust"])

    def unsigned_but_signature_present(manifest):
        manifest["signed"] = False
        manifest["hops"][-1]["signer"] = None

    forge_bundle(path, tmp_path / "g.relay", keys["a"], edit=unsigned_but_signature_present)
    rejects(tmp_path / "g.relay", "'signed' flag disagrees", trust=keys["trust"])
    parts = members_of(path)
    save_members(tmp_path / "s.relay", parts[MANIFEST_NAME], parts[WEIGHTS_NAME], b"x" * 63)
    rejects(tmp_path / "s.relay", "63 bytes", trust=keys["trust"])


# ----- the container --------------------------------------------------------------------------


def test_truncated_files_are_rejected(tmp_path, keys):
    data = write(tmp_path / "b.relay", keys["a"]).read_bytes()
    for length in (0, 1, 21, 22, 100, len(data) // 2, len(data) - 22, len(data) - 1):
        (tmp_path / "t.relay").write_bytes(data[:length])
        rejects(tmp_path / "t.relay", "", trust=keys["trust"])
    (tmp_path / "padded.relay").write_bytes(data + b"\0")
    rejects(tmp_path / "padded.relay", "no ZIP end record", trust=keys["trust"])


def test_a_large_file_without_an_end_record_is_refused_before_it_is_read(tmp_path, keys, monkeypatch):
    import relaylearn.bundle as bundle_module

    sparse = tmp_path / "sparse.relay"
    with open(sparse, "wb") as handle:  # 1 GiB of nothing, taking no disk space
        handle.truncate(1 << 30)
    read_sizes = []
    real_open = open

    def spying_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        read = handle.read
        handle.read = lambda n=-1: read_sizes.append(n) or read(n)
        return handle

    monkeypatch.setattr(bundle_module, "open", spying_open, raising=False)
    rejects(sparse, "no ZIP end record", trust=keys["trust"])
    assert read_sizes and max(read_sizes) <= 64, read_sizes


def test_missing_file_folder_and_device_are_verification_errors(tmp_path, keys):
    rejects(tmp_path / "nope.relay", "cannot read bundle", trust=keys["trust"])
    rejects(tmp_path, "not a regular file", trust=keys["trust"])
    if Path("/dev/zero").exists():
        rejects("/dev/zero", "not a regular file", trust=keys["trust"])  # would otherwise never end


def test_extra_missing_duplicate_and_path_trick_members(tmp_path, keys):
    parts = members_of(write(tmp_path / "b.relay", keys["a"]))
    canonical = [(name, parts[name]) for name in MEMBER_NAMES]
    save_container(tmp_path / "extra.relay", canonical + [("payload.py", b"import os")])
    rejects(tmp_path / "extra.relay", "unexpected member 'payload.py'", trust=keys["trust"])
    save_container(tmp_path / "missing.relay", canonical[:2])
    rejects(tmp_path / "missing.relay", "missing member 'manifest.sig'", trust=keys["trust"])
    save_container(tmp_path / "dup.relay", canonical + [canonical[0]])
    rejects(tmp_path / "dup.relay", "duplicate member 'manifest.json'", trust=keys["trust"])
    save_container(tmp_path / "trick.relay", [("../manifest.json", parts[MANIFEST_NAME])] + canonical[1:])
    rejects(tmp_path / "trick.relay", r"unexpected member '\.\./manifest.json'", trust=keys["trust"])
    save_container(tmp_path / "dir.relay", canonical + [("weights/", b"")])
    rejects(tmp_path / "dir.relay", "unexpected member 'weights/'", trust=keys["trust"])
    save_container(tmp_path / "order.relay", canonical[::-1])
    rejects(tmp_path / "order.relay", "canonical order", trust=keys["trust"])
    # appended with a standard tool, too
    with zipfile.ZipFile(tmp_path / "b.relay", "a") as archive:
        archive.writestr("notes.txt", "hello")
    rejects(tmp_path / "b.relay", "unexpected member 'notes.txt'", trust=keys["trust"])


def test_compressed_members_are_rejected_without_decompressing(tmp_path, keys):
    parts = members_of(write(tmp_path / "b.relay", keys["a"]))
    with zipfile.ZipFile(tmp_path / "deflated.relay", "w", zipfile.ZIP_DEFLATED) as archive:
        for name in MEMBER_NAMES:
            archive.writestr(name, parts[name])
    rejects(tmp_path / "deflated.relay", "'manifest.json' is compressed", trust=keys["trust"])


def test_rezipped_by_another_tool_is_not_canonical(tmp_path, keys):
    parts = members_of(write(tmp_path / "b.relay", keys["a"]))
    with zipfile.ZipFile(tmp_path / "rezip.relay", "w", zipfile.ZIP_STORED) as archive:
        for name in MEMBER_NAMES:
            archive.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), parts[name])
    rejects(tmp_path / "rezip.relay", "canonical form", trust=keys["trust"])


def _patch_declared_size(data: bytes, member_index: int, new_size: int) -> bytes:
    """Set the declared sizes of one member in its central directory entry (CRC untouched)."""
    end = struct.unpack("<IHHHHIIH", data[-22:])
    pos = end[6]
    for _ in range(member_index):
        name_len = struct.unpack("<H", data[pos + 28 : pos + 30])[0]
        pos += 46 + name_len
    return data[: pos + 20] + struct.pack("<II", new_size, new_size) + data[pos + 28 :]


def test_zip_bomb_and_lying_sizes_are_rejected_before_reading(tmp_path, keys, monkeypatch):
    data = write(tmp_path / "b.relay", keys["a"]).read_bytes()
    crc_calls = []
    monkeypatch.setattr(bundle_module.zlib, "crc32", lambda *a: crc_calls.append(1) or zlib.crc32(*a))
    (tmp_path / "bomb.relay").write_bytes(_patch_declared_size(data, 1, 0xFFFFFFF0))
    rejects(tmp_path / "bomb.relay", "over its limit", trust=keys["trust"])
    (tmp_path / "big_manifest.relay").write_bytes(_patch_declared_size(data, 0, 2 << 20))
    rejects(tmp_path / "big_manifest.relay", "over its limit", trust=keys["trust"])
    (tmp_path / "lying.relay").write_bytes(_patch_declared_size(data, 1, 10_000))
    rejects(tmp_path / "lying.relay", "add up to", trust=keys["trust"])
    assert crc_calls == []  # no member was read, let alone decompressed
    # a classic deflate bomb: 50 MB of zeros in a few KB, named like a member
    with zipfile.ZipFile(tmp_path / "deflate_bomb.relay", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(MANIFEST_NAME, b"\0" * (50 << 20))
    assert (tmp_path / "deflate_bomb.relay").stat().st_size < 100_000
    rejects(tmp_path / "deflate_bomb.relay", "missing member", trust=keys["trust"])


def test_crc_mismatch_is_rejected(tmp_path, keys):
    data = bytearray(write(tmp_path / "b.relay", keys["a"]).read_bytes())
    data[30 + len(MANIFEST_NAME) + 5] ^= 0x01  # inside manifest.json's data
    (tmp_path / "c.relay").write_bytes(bytes(data))
    rejects(tmp_path / "c.relay", "CRC mismatch in member 'manifest.json'", trust=keys["trust"])


# ----- manifest and weights -------------------------------------------------------------------


def test_manifest_must_be_canonical_json(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    forge_bundle(path, tmp_path / "compact.relay", keys["a"], dump=lambda m: json.dumps(m, sort_keys=True).encode())
    rejects(tmp_path / "compact.relay", "canonical form", trust=keys["trust"])

    def with_duplicate_key(manifest):
        text = _dump_manifest(manifest).decode()
        return text.replace('{\n "config": {', '{\n "config": {"evil": 1},\n "config": {', 1).encode()

    forge_bundle(path, tmp_path / "dup.relay", keys["a"], dump=with_duplicate_key)
    rejects(tmp_path / "dup.relay", "canonical form", trust=keys["trust"])
    with_nan = lambda m: _dump_manifest(m).replace(b'"epochs": 2', b'"epochs": NaN')  # noqa: E731
    forge_bundle(path, tmp_path / "nan.relay", keys["a"], dump=with_nan)
    rejects(tmp_path / "nan.relay", "not valid JSON", trust=keys["trust"])
    forge_bundle(path, tmp_path / "latin.relay", keys["a"], dump=lambda m: _dump_manifest(m).replace(b'"note"', b'"n\xe9te"'))
    rejects(tmp_path / "latin.relay", "UTF-8", trust=keys["trust"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(format_version=2), "format_version 2"),
        (lambda m: m.update(format="something-else"), "not a relay bundle"),
        (lambda m: m.update(unexpected=1), "unexpected: Extra inputs"),
        (lambda m: m.pop("hops"), "hops: Field required"),
        (lambda m: m.update(hops=[]), "hops: List should have at least 1"),
        (lambda m: m["hops"][0].update(order=2), "hop chain is broken"),
        (lambda m: m["hops"][0].update(parent_sha256="a" * 64), "first hop has a parent"),
        (lambda m: m["hops"][0].update(started_utc="2024-13-01T00:00:00Z"), "started_utc"),
        (lambda m: m["hops"][0].update(site="../etc"), "hops.0.site"),
        (lambda m: m["tensors"]["solver.conv.bias"].update(dtype="complex64"), "dtype"),
        (lambda m: m["tensors"]["solver.conv.bias"].update(shape=[True]), "shape"),
        (lambda m: m.update(weights_bytes="12"), "weights_bytes"),
        (lambda m: m.update(weights_sha256="0" * 64), "SHA-256 of weights"),
        (lambda m: m.update(weights_bytes=m["weights_bytes"] + 1), "SHA-256 of weights"),
    ],
)
def test_manifest_schema_and_consistency(tmp_path, keys, edit, match):
    path = write(tmp_path / "b.relay", keys["a"])
    forge_bundle(path, tmp_path / "f.relay", keys["a"], edit=edit)
    rejects(tmp_path / "f.relay", match, trust=keys["trust"])


def test_second_hop_without_parent_hash_is_rejected(tmp_path, keys):
    first = read_bundle(write(tmp_path / "b1.relay", keys["a"]), trust=keys["trust"])
    second = write(tmp_path / "b2.relay", keys["b"], parent=first)
    forge_bundle(second, tmp_path / "f.relay", keys["b"], edit=lambda m: m["hops"][1].update(parent_sha256=None))
    rejects(tmp_path / "f.relay", "hop 2 names no parent", trust=keys["trust"])


def test_tensor_index_disagreeing_with_weights_is_rejected(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    reshaped = lambda m: m["tensors"]["solver.conv.weight"].update(shape=[4, 9])  # noqa: E731
    forge_bundle(path, tmp_path / "shape.relay", keys["a"], edit=reshaped)
    expected = r"disagrees.*'solver.conv.weight': manifest float32\[4, 9\], weights float32\[4, 3, 3, 3\]"
    rejects(tmp_path / "shape.relay", expected, trust=keys["trust"])
    forge_bundle(path, tmp_path / "name.relay", keys["a"], edit=lambda m: m["tensors"].pop("gen.mask"))
    rejects(tmp_path / "name.relay", r"'gen.mask': manifest absent", trust=keys["trust"])
    other = safetensors.torch.save({"solver.conv.weight": torch.zeros(4, 3, 3, 3)})
    forge_bundle(path, tmp_path / "weights.relay", keys["a"], weights=other)
    rejects(tmp_path / "weights.relay", "disagrees", trust=keys["trust"])


def test_weights_altered_after_signing_is_rejected(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    weights = bytearray(members_of(path)[WEIGHTS_NAME])
    weights[-1] ^= 0x40
    forge_bundle(path, tmp_path / "w.relay", None, weights=bytes(weights), update_hash=False)
    rejects(tmp_path / "w.relay", "SHA-256 of weights", trust=keys["trust"])


def test_safetensors_metadata_and_bad_headers_are_rejected(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    tensors = {name: tensor.contiguous() for name, tensor in sample_tensors().items()}
    with_metadata = safetensors.torch.save(tensors, metadata={"x": "y"})
    forge_bundle(path, tmp_path / "meta.relay", keys["a"], weights=with_metadata)
    rejects(tmp_path / "meta.relay", "__metadata__", trust=keys["trust"])
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, 4]}}).encode()
    forge_bundle(path, tmp_path / "size.relay", keys["a"], weights=struct.pack("<Q", len(header)) + header + b"\0" * 4)
    rejects(tmp_path / "size.relay", "does not match its dtype and shape", trust=keys["trust"])
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    header = json.dumps({"a": entry, "b": entry}).encode()
    forge_bundle(path, tmp_path / "overlap.relay", keys["a"], weights=struct.pack("<Q", len(header)) + header + b"\0" * 8)
    rejects(tmp_path / "overlap.relay", "overlap or leave gaps", trust=keys["trust"])
    # a name given twice: json.loads kept the last entry, so the index the bundle was read with
    # was not the header every other safetensors reader sees
    header = b'{"a": %s, "a": %s}' % (json.dumps({**entry, "shape": [2], "data_offsets": [0, 8]}).encode(), json.dumps(entry).encode())
    index = {"a": {"dtype": "float32", "shape": [1]}}
    forge_bundle(path, tmp_path / "dup.relay", keys["a"], weights=struct.pack("<Q", len(header)) + header + b"\0" * 4, edit=lambda m: m.update(tensors=index))
    rejects(tmp_path / "dup.relay", "names tensor 'a' twice", trust=keys["trust"])
    forge_bundle(path, tmp_path / "huge.relay", keys["a"], weights=struct.pack("<Q", 2**63) + b"{}")
    rejects(tmp_path / "huge.relay", "header length", trust=keys["trust"])
    # a shape of 200 000 huge dimensions (the last 0, so the declared size is 0): refused before
    # any arithmetic on it (a product over it took minutes), by a signer the site trusts
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40] * 200_000 + [0], "data_offsets": [0, 0]}}).encode()
    forge_bundle(path, tmp_path / "dims.relay", keys["a"], weights=struct.pack("<Q", len(header)) + header)
    started = time.perf_counter()
    rejects(tmp_path / "dims.relay", "malformed", trust=keys["trust"])
    assert time.perf_counter() - started < 10


class _WritesMarker:
    """Unpickling this object creates the file ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_never_unpickled(tmp_path, keys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_WritesMarker(marker), protocol=4)
    assert payload[:1] == b"\x80"
    path = write(tmp_path / "b.relay", keys["a"])
    forge_bundle(path, tmp_path / "swapped.relay", None, weights=payload, update_hash=False)  # swapped on the USB stick
    rejects(tmp_path / "swapped.relay", r"SHA-256 of weights.*holds a pickle", trust=keys["trust"])
    forge_bundle(path, tmp_path / "signed.relay", keys["a"], weights=payload)  # even when a trusted key signed it
    rejects(tmp_path / "signed.relay", "pickle", trust=keys["trust"])
    with pytest.raises(VerificationError, match="pickle"):
        inspect_bundle(tmp_path / "signed.relay")
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": _WritesMarker(marker)}, buffer)
    forge_bundle(path, tmp_path / "torchsave.relay", keys["a"], weights=buffer.getvalue())
    rejects(tmp_path / "torchsave.relay", "torch.save", trust=keys["trust"])
    assert not marker.exists()


def test_reading_never_touches_pickle_or_torch_load(tmp_path, keys, monkeypatch):
    path = write(tmp_path / "b.relay", keys["a"])

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle or torch.load was used")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    assert read_bundle(path, trust=keys["trust"]).signed_by == "SiteA"
    assert inspect_bundle(path)["tensor_count"] == len(sample_tensors())


# ----- writing --------------------------------------------------------------------------------


def test_write_rejects_bad_inputs_and_leaves_nothing(tmp_path, keys):
    target = tmp_path / "out" / "b.relay"
    with pytest.raises(UserError, match="site name"):
        write(target, keys["a"], site="bad name")
    with pytest.raises(UserError, match="config cannot be written as JSON"):
        write(target, keys["a"], config={"path": Path("/data/hospital")})
    with pytest.raises(UserError, match="extra cannot be written as JSON"):
        write(target, keys["a"], extra={"dice": float("nan")})
    with pytest.raises(ValueError, match="cannot go into a bundle"):
        write(target, keys["a"], tensors={"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="tensor name"):
        write(target, keys["a"], tensors={"__metadata__": torch.zeros(2)})
    with pytest.raises(ValueError, match="hop_started_utc"):
        write(target, keys["a"], hop_started_utc="yesterday")
    assert not target.exists()


def test_write_replaces_atomically_and_handles_shared_storage(tmp_path, keys):
    target = tmp_path / "b.relay"
    target.write_bytes(b"old")
    base = torch.arange(6.0)
    tied = {"a.weight": base, "b.weight": base, "a.view": base[::2]}  # shared storage, strided view
    write(target, keys["a"], tensors=tied)
    bundle = read_bundle(target, trust=keys["trust"])
    assert torch.equal(bundle.tensors["a.view"], torch.tensor([0.0, 2.0, 4.0]))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.is_dir()) == ["b.relay"]


def test_overhead_over_raw_weights_is_small(tmp_path, keys):
    tensors = {f"solver.layer{i}.weight": torch.zeros(64, 64) for i in range(20)}  # 81,920 fp32 params
    path = write(tmp_path / "b.relay", keys["a"], tensors=tensors)
    info = inspect_bundle(path)
    assert info["total_parameters"] == 81_920
    assert info["networks"]["solver"]["bytes"] == 4 * 81_920
    assert info["file_bytes"] - 4 * 81_920 < 8_000  # headers + manifest + signature


# ----- inspect --------------------------------------------------------------------------------


def test_inspect_without_trust(tmp_path, keys):
    first = read_bundle(write(tmp_path / "b1.relay", keys["a"]), trust=keys["trust"])
    path = write(tmp_path / "b2.relay", keys["b"], parent=first, extra={"train_images": {"SiteB": 99}})
    info = inspect_bundle(path)
    assert info["signed"] is True and info["signature"] == "not checked" and info["signer"] == keys["b"].fingerprint
    assert [hop["site"] for hop in info["hops"]] == ["SiteA", "SiteB"]
    assert info["strategy"] == "relay" and info["tensor_count"] == 7
    expected_elements = sum(t.numel() for t in sample_tensors().values())
    assert info["total_parameters"] == expected_elements == 108 + 4 + 1 + 15 + 6 + 3 + 0
    assert info["networks"]["solver"] == {"tensors": 4, "parameters": 128, "bytes": 108 * 4 + 4 * 2 + 8 + 15 * 8}
    assert info["networks"]["gen"] == {"tensors": 2, "parameters": 9, "bytes": 6 * 2 + 3}
    assert info["file_bytes"] == path.stat().st_size and info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    json.dumps(info)  # the --json output
    text = format_inspect(info)
    for needle in ("SiteA", "SiteB", "NOT checked", "solver", "MB", "train_images", first.sha256[:16]):
        assert needle in text
    unsigned = inspect_bundle(write(tmp_path / "u.relay", None, site="Sim"))
    assert unsigned["signature"] == "absent" and unsigned["signer"] is None
    assert "UNSIGNED" in format_inspect(unsigned)


def test_an_unsigned_bundle_names_the_options_of_every_command_that_takes_one(tmp_path, keys, capsys):
    """train takes --insecure-unsigned; test/predict/export/audit take --no-verify (with --trust: refused)."""
    from relaylearn.cli import main

    path = write(tmp_path / "u.relay", None, site="Sim")
    with pytest.raises(VerificationError) as err:
        read_bundle(path, trust=keys["trust"])
    assert "train --insecure-unsigned" in str(err.value) and "test/predict/export/audit --no-verify" in str(err.value)
    assert "--no-verify" in format_inspect(inspect_bundle(path))
    assert main(["export", "--bundle", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--trust", str(tmp_path), "--no-verify"]) == 2
    assert (
        capsys.readouterr().err
        == "relaylearn: error: relaylearn export: --trust and --no-verify exclude each other: give --trust DIR to verify the bundle, or --no-verify not to\n"
    )
    assert not (tmp_path / "m.onnx").exists()


def test_inspect_still_checks_structure_and_hashes(tmp_path, keys):
    path = write(tmp_path / "b.relay", keys["a"])
    weights = bytearray(members_of(path)[WEIGHTS_NAME])
    weights[-1] ^= 0x01
    forge_bundle(path, tmp_path / "w.relay", None, weights=bytes(weights), update_hash=False)
    with pytest.raises(VerificationError, match="SHA-256"):
        inspect_bundle(tmp_path / "w.relay")
    forge_bundle(path, tmp_path / "other_key.relay", keys["outsider"])  # signature is not checked by inspect
    assert inspect_bundle(tmp_path / "other_key.relay")["signer"] == keys["outsider"].fingerprint


# ----- rollback protection --------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path, keys):
    """b1 (SiteA) → b2 (SiteB) → b3 (SiteA), plus fork: another bundle made by SiteB from b1."""
    b1 = read_bundle(write(tmp_path / "b1.relay", keys["a"]), trust=keys["trust"])
    b2 = read_bundle(write(tmp_path / "b2.relay", keys["b"], parent=b1), trust=keys["trust"])
    b3 = read_bundle(write(tmp_path / "b3.relay", keys["a"], parent=b2), trust=keys["trust"])
    fork = write(tmp_path / "fork.relay", keys["b"], parent=b1, extra={"retrained": True})
    fork = read_bundle(fork, trust=keys["trust"])
    return b1, b2, b3, fork


def test_ledger_accepts_forward_chains_and_rereads(tmp_path, chain):
    b1, b2, b3, _ = chain
    ledger = SiteLedger(tmp_path / "site" / "ledger.json")
    assert ledger.lineage() == []
    ledger.check(b2)  # first contact: accepted
    ledger.record(b2)
    ledger.check(b2)  # the same received bundle again (restarted training): accepted
    ledger.check(b3)  # b3 extends b2
    ledger.record(b3)
    assert ledger.lineage() == [b1.sha256, b2.sha256, b3.sha256]


def test_ledger_rejects_rollback(tmp_path, chain, keys):
    b1, b2, _, _ = chain
    ledger = SiteLedger(tmp_path / "ledger.json")
    ledger.record(b2)
    with pytest.raises(VerificationError, match="rollback") as info:
        ledger.check(b1)
    assert info.value.exit_code == 3
    rejects(b1.path, "rollback", trust=keys["trust"], ledger=ledger)
    with pytest.raises(VerificationError, match="rollback"):
        ledger.record(b1)
    assert ledger.lineage() == b2.lineage


def test_ledger_rejects_fork(tmp_path, chain):
    _, b2, b3, fork = chain
    ledger = SiteLedger(tmp_path / "ledger.json")
    ledger.record(b2)
    with pytest.raises(VerificationError, match="fork: .* diverges at hop 2"):
        ledger.check(fork)
    ledger.record(b3)
    with pytest.raises(VerificationError, match="fork"):
        ledger.check(fork)


def test_ledger_takes_own_bundle_back_only_when_newer(tmp_path, chain, keys):
    b1, b2, _, _ = chain
    ledger = SiteLedger(tmp_path / "siteA-ledger.json")
    ledger.record(b1.path, written=True)  # SiteA wrote b1 (recorded from its path)
    with pytest.raises(VerificationError, match="wrote this bundle itself"):
        ledger.check(b1)
    rejects(b1.path, "wrote this bundle itself", trust=keys["trust"], ledger=ledger)
    ledger.check(b2)  # SiteB trained on it since: accepted
    assert read_bundle(b2.path, trust=keys["trust"], ledger=ledger).sha256 == b2.sha256


def test_ledger_file_errors_are_user_errors(tmp_path, chain):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="ledger is unreadable"):
        SiteLedger(path).check(chain[0])
    state = {"format": "relaylearn-site-ledger", "version": 1, "lineage": ["xyz"], "last": "received"}
    path.write_text(json.dumps(state))
    with pytest.raises(UserError, match="ledger is unreadable"):
        SiteLedger(path).lineage()


@pytest.mark.parametrize("edit", ["lineage as an object", "nested too deeply", "a list"])
def test_a_hand_edited_ledger_is_a_user_error_naming_it(tmp_path, chain, edit):
    b1, b2, _, _ = chain
    path = tmp_path / "ledger.json"
    SiteLedger(path).record(b1)
    state = json.loads(path.read_text())
    text = {
        "lineage as an object": json.dumps({**state, "lineage": {h: 1 for h in state["lineage"]}}),
        "nested too deeply": "[" * 100_000,
        "a list": json.dumps([state]),
    }[edit]
    path.write_text(text)
    for use in (lambda: SiteLedger(path).check(b2), lambda: SiteLedger(path).record(b2)):
        with pytest.raises(UserError, match="site ledger is unreadable") as refused:
            use()
        assert refused.value.path == str(path) and refused.value.exit_code == 2
    assert path.read_text() == text, "left as it was"


# ----- hardening: relay id, key <-> site binding, non-finite tensors, escaping, atomic writes ------


def test_relay_id_is_fixed_at_the_first_hop_and_checked(tmp_path, keys):
    first = read_bundle(write(tmp_path / "b1.relay", keys["a"], relay_id="glaucoma-2026"), trust=keys["trust"])
    assert first.manifest["relay_id"] == "glaucoma-2026"
    second = read_bundle(write(tmp_path / "b2.relay", keys["b"], parent=first), trust=keys["trust"])
    assert second.manifest["relay_id"] == "glaucoma-2026"  # copied, and covered by the signature
    with pytest.raises(UserError, match="differs from the parent"):
        write(tmp_path / "b3.relay", keys["b"], parent=first, relay_id="another")
    assert read_bundle(tmp_path / "b2.relay", trust=keys["trust"], expect_relay_id="glaucoma-2026").sha256 == second.sha256
    error = rejects(tmp_path / "b2.relay", "belongs to relay", trust=keys["trust"], expect_relay_id="other-relay")
    assert "'glaucoma-2026'" in error.message and "'other-relay'" in error.message
    # the default id is derived from the first hop (deterministic), and a changed id breaks the signature
    assert write(tmp_path / "d.relay", keys["a"]).read_bytes() == write(tmp_path / "e.relay", keys["a"]).read_bytes()
    forged = forge_bundle(tmp_path / "b2.relay", tmp_path / "moved.relay", None, edit=lambda m: m.update(relay_id="other-relay"))
    rejects(forged, "signature", trust=keys["trust"])
    rejects(forge_bundle(tmp_path / "b1.relay", tmp_path / "bad_id.relay", keys["a"], edit=lambda m: m.update(relay_id="../x")),
            "relay_id", trust=keys["trust"])  # fmt: skip


def test_a_hop_must_name_the_site_of_the_key_that_signed_it(tmp_path, keys):
    """Site B signing a hop that claims to be SiteA is refused whenever sites are bound."""
    impostor = write(tmp_path / "impostor.relay", keys["b"], site="SiteA")
    assert read_bundle(impostor, trust=keys["trust"]).signed_by == "SiteB"  # the low-level reader alone
    error = rejects(impostor, "names site 'SiteA' but was signed by the key of site 'SiteB'", trust=keys["trust"], bind_sites=True)
    assert keys["b"].fingerprint in error.message
    with pytest.raises(VerificationError, match="signed by the key of site 'SiteB'"):
        verify_bundle(impostor, keys["trust"])
    # an earlier hop is checked too, against what the signed manifest records
    first = read_bundle(write(tmp_path / "b1.relay", keys["b"], site="SiteA"), trust=keys["trust"])
    second = write(tmp_path / "b2.relay", keys["b"], parent=first)
    rejects(second, "hop 1 names site 'SiteA'", trust=keys["trust"], bind_sites=True)
    honest = write(tmp_path / "honest.relay", keys["a"])
    assert verify_bundle(honest, keys["trust"]).signed_by == "SiteA"


def test_keygen_binds_the_site_name_into_the_key_files(tmp_path):
    private, public = generate_keypair(tmp_path / "keys", "Hospital-A")
    assert public.read_text().splitlines()[-1] == "relaylearn-site: Hospital-A"
    assert private.read_text().splitlines()[-1] == "relaylearn-site: Hospital-A"
    renamed = tmp_path / "trust" / "Hospital-C.pub"
    renamed.parent.mkdir()
    renamed.write_bytes(public.read_bytes())
    with pytest.raises(UserError, match="made for site 'Hospital-A'"):
        load_trust_dir(renamed.parent)
    stolen = tmp_path / "Hospital-C.key"
    stolen.write_bytes(private.read_bytes())
    stolen.chmod(0o600)
    with pytest.raises(UserError, match="made for site 'Hospital-A'"):
        load_private_key(stolen)


def test_non_finite_tensors_are_refused_on_reading_and_writing(tmp_path, keys):
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensors = sample_tensors()
        tensors["solver.conv.weight"][0, 0, 0, 0] = bad
        target = tmp_path / "nan.relay"
        with pytest.raises(RelayError, match="solver.conv.weight.*NaN or infinite"):
            write(target, keys["a"], tensors=tensors)
        assert not target.exists() and not list(tmp_path.glob(".*tmp"))
    good = write(tmp_path / "good.relay", keys["a"])
    tensors = sample_tensors()
    tensors["gen.w_avg"][2] = float("nan")  # bfloat16 as well
    forged = forge_bundle(good, tmp_path / "forged.relay", keys["a"], weights=safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
    rejects(forged, "'gen.w_avg' holds NaN or infinite", trust=keys["trust"])


def test_bool_tensors_hold_only_zero_and_one(tmp_path, keys):
    """A byte other than 0/1 in a bool tensor is undefined behaviour in torch: refused on reading."""
    good = write(tmp_path / "good.relay", keys["a"])
    tensors = sample_tensors()
    tensors["gen.mask"] = torch.tensor([2, 0, 1], dtype=torch.uint8).view(torch.bool)
    forged = forge_bundle(good, tmp_path / "forged.relay", keys["a"], weights=safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}))
    rejects(forged, "'gen.mask' is bool but holds bytes other than 0 and 1", trust=keys["trust"])


def test_inspect_escapes_every_string_from_the_bundle(tmp_path, keys):
    nasty = "\x1b[2J\x1b[1;1HOK: verified\r\u202e"
    good = write(tmp_path / "good.relay", keys["a"], extra={nasty: nasty})
    path = forge_bundle(good, tmp_path / "nasty.relay", keys["a"], edit=lambda m: (
        m.update(strategy=nasty[:60]), m["software"].update(torch=nasty, relaylearn=nasty)))  # fmt: skip
    text = format_inspect(inspect_bundle(path))
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert all(line.isprintable() for line in text.splitlines())
    assert "\\x1b[2J" in text


def test_atomic_write_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    target = tmp_path / "out.bin"
    target.symlink_to(victim)  # a link planted at the output name is replaced, not written through
    atomic_write(target, b"new")
    assert victim.read_text() == "precious" and not target.is_symlink() and target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
