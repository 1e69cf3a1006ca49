"""Tampering and fuzzing: every single-byte change and bit flip of a bundle must be rejected, and the
reader must never fail with anything but VerificationError, whatever bytes it is given.

Run with ``-s`` to see how many cases ran and which check caught them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import struct
import time
import zipfile
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaylearn.bundle import (
    DTYPES,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    WEIGHTS_NAME,
    Bundle,
    _container_parts,
    _dump_manifest,
    inspect_bundle,
    read_bundle,
    write_bundle,
)
from relaylearn.errors import VerificationError
from relaylearn.keys import generate_keypair, load_private_key, load_trust_dir
from tests.conftest import signed_container

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny signed bundle (~1.6 KB), its key and trust store, and a scratch file path."""
    root = tmp_path_factory.mktemp("fuzz")
    key = load_private_key(generate_keypair(root / "keys", "SiteA")[0])
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "solver.w": torch.randn(4, 4, generator=gen),
        "solver.b": torch.randn(4, generator=gen).half(),
        "gen.steps": torch.tensor(3),
    }
    path = write_bundle(
        root / "valid.relay", tensors, strategy="relay", config={"lr": 0.001}, registry={"Domain1": 0},
        site="SiteA", hop_started_utc="2024-05-01T08:00:00Z", parent=None, signing_key=key,
        finished_utc="2024-05-01T09:00:00Z",
    )  # fmt: skip
    trust = load_trust_dir(root / "keys")
    return {"key": key, "trust": trust, "data": path.read_bytes(), "scratch": root / "case.relay"}


def outcome(setup, data: bytes, **kwargs) -> str:
    """'accepted', or the kind of VerificationError; any other exception propagates (test failure)."""
    setup["scratch"].write_bytes(data)
    kwargs.setdefault("trust", setup["trust"])
    try:
        result = read_bundle(setup["scratch"], **kwargs)
    except VerificationError as exc:
        assert exc.message.isprintable() and len(exc.message) <= 300, f"reason is not one short line: {exc.message!r}"
        return _kind(exc)
    assert isinstance(result, Bundle)
    return "accepted"


def _kind(exc: VerificationError) -> str:
    """The check that fired, as a stable label: the reason without names, numbers or details."""
    reason = re.sub(r"\(.*", "", exc.message)
    return re.sub(r"'[^']*'|\b[0-9]+\b|SHA256:[0-9a-f]+", "…", reason).strip()[:70]


def _report(title: str, counts: Counter, seconds: float) -> None:
    total = sum(counts.values())
    print(f"\n{title}: {total} cases in {seconds:.2f} s ({1e3 * seconds / max(1, total):.2f} ms each)")
    for kind, count in counts.most_common():
        print(f"  {count:6d}  {kind}")


def test_the_untouched_bundle_is_accepted(setup):
    assert outcome(setup, setup["data"]) == "accepted"


def test_every_single_byte_change_is_rejected(setup):
    """Every position of the file changed once, plus 1,000 random positions, each to another value."""
    data, rng = setup["data"], random.Random(20240501)
    positions = list(range(len(data))) + [rng.randrange(len(data)) for _ in range(1000)]
    counts, start = Counter(), time.perf_counter()
    for position in positions:
        mutated = bytearray(data)
        mutated[position] = (data[position] + rng.randrange(1, 256)) % 256
        kind = outcome(setup, bytes(mutated))
        assert kind != "accepted", f"changing byte {position} went unnoticed"
        counts[kind] += 1
    _report(f"single-byte changes ({len(data)} byte file)", counts, time.perf_counter() - start)
    assert len(positions) >= 1000


def test_random_bit_flips_are_rejected(setup):
    """2,000 distinct single-bit flips at random positions, one at a time.

    (Set RELAYLEARN_ALL_BIT_FLIPS=1 to flip every bit of the file instead: ~13,000 cases, ~3 s.)
    """
    data, rng = setup["data"], random.Random(8032)
    every_bit = [(position, bit) for position in range(len(data)) for bit in range(8)]
    flips = every_bit if os.environ.get("RELAYLEARN_ALL_BIT_FLIPS") else rng.sample(every_bit, 2000)
    counts, start = Counter(), time.perf_counter()
    for position, bit in flips:
        mutated = bytearray(data)
        mutated[position] ^= 1 << bit
        kind = outcome(setup, bytes(mutated))
        assert kind != "accepted", f"flipping bit {bit} of byte {position} went unnoticed"
        counts[kind] += 1
    _report("single-bit flips", counts, time.perf_counter() - start)
    assert sum(counts.values()) >= 1000


def test_every_member_byte_change_with_fixed_up_crcs_is_rejected(setup):
    """An attacker recomputes CRCs and headers: every changed byte inside any member is still caught
    (manifest and signature by Ed25519, weights by the signed SHA-256)."""
    members, rng = _members(setup), random.Random(7)
    counts, start = Counter(), time.perf_counter()
    for name, content in members.items():
        for position in range(len(content)):
            changed = bytearray(content)
            changed[position] = (content[position] + rng.randrange(1, 256)) % 256
            rebuilt = dict(members, **{name: bytes(changed)})
            parts = _container_parts([(n, rebuilt[n]) for n in (MANIFEST_NAME, WEIGHTS_NAME, SIGNATURE_NAME)])
            kind = outcome(setup, b"".join(bytes(p) for p in parts))
            assert kind != "accepted", f"changing byte {position} of {name} went unnoticed"
            counts[f"{name}: {kind}"] += 1
    _report("member byte changes with valid CRCs and canonical headers", counts, time.perf_counter() - start)


# ----- hypothesis: the reader returns a Bundle or raises VerificationError, nothing else -----------


def _must_not_crash(setup, data: bytes, *, also_inspect: bool = True) -> None:
    outcome(setup, data)
    if also_inspect:  # the path without a signature check reaches the parsers with unsigned input
        try:
            inspect_bundle(setup["scratch"])
        except VerificationError:
            pass


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(setup, data):
    _must_not_crash(setup, data)


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_behind_a_zip_signature(setup, data):
    _must_not_crash(setup, b"PK\x03\x04" + data + b"PK\x05\x06" + data[-18:])


_edit = st.one_of(
    st.tuples(st.just("overwrite"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=64)),
)


def _apply(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for op, position, arg in edits:
        position = position % (len(out) + 1)
        if op == "overwrite":
            out[position : position + len(arg)] = arg
        elif op == "insert":
            out[position:position] = arg
        elif op == "delete":
            del out[position : position + arg]
        elif op == "truncate":
            del out[position:]
        else:
            out += arg
    return bytes(out)


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutations_of_a_valid_bundle(setup, edits):
    _must_not_crash(setup, _apply(setup["data"], edits))


# Past the signature: a trusted key signs fuzzed manifests and weights, so the deep parsers
# (manifest schema, hop chain, safetensors header, tensor loading) see adversarial input too.

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
_manifest_paths = st.sampled_from([
    ("format_version",), ("signed",), ("software",), ("software", "torch"), ("strategy",), ("config",),
    ("registry",), ("tensors",), ("tensors", "solver.w"), ("tensors", "solver.w", "shape"),
    ("tensors", "solver.w", "dtype"), ("weights_sha256",), ("weights_bytes",), ("hops",), ("hops", 0),
    ("hops", 0, "order"), ("hops", 0, "site"), ("hops", 0, "signer"), ("hops", 0, "parent_sha256"),
    ("hops", 0, "started_utc"), ("extra",), ("new_field",),
])  # fmt: skip


def _signed_container(setup, manifest_bytes: bytes, weights: bytes) -> bytes:
    return signed_container(manifest_bytes, weights, setup["key"])


def _members(setup) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(setup["data"])) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@FUZZ
@given(replacements=st.lists(st.tuples(_manifest_paths, _json), min_size=1, max_size=3))
def test_signed_manifests_with_fuzzed_fields(setup, replacements):
    members = _members(setup)
    manifest = json.loads(members[MANIFEST_NAME])
    for path, value in replacements:
        target = manifest
        try:
            for step in path[:-1]:
                target = target[step]
            target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    try:
        manifest_bytes = _dump_manifest(manifest)
    except (ValueError, TypeError):
        return
    _must_not_crash(setup, _signed_container(setup, manifest_bytes, members[WEIGHTS_NAME]), also_inspect=False)


_header_entry = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from([code for code, _ in DTYPES.values()] + ["F8", "C64", "", 3]),
            "shape": st.lists(st.integers(-1, 5), max_size=3) | _json,
            "data_offsets": st.lists(st.integers(-2, 200), min_size=0, max_size=3) | _json,
        }
    )
    | _json
)


@FUZZ
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=6), _header_entry, max_size=4) | _json,
    data=st.binary(max_size=200),
    declared_extra=st.integers(-8, 8),
)
def test_signed_weights_with_fuzzed_safetensors_headers(setup, header, data, declared_extra):
    header_bytes = json.dumps(header).encode()
    weights = struct.pack("<Q", max(0, len(header_bytes) + declared_extra)) + header_bytes + data
    manifest = json.loads(_members(setup)[MANIFEST_NAME])
    manifest["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    manifest["weights_bytes"] = len(weights)
    if isinstance(header, dict):  # let the index agree with the header where it can, to reach tensor loading
        dtype_names = {code: name for name, (code, _) in DTYPES.items()}
        manifest["tensors"] = {
            name: {"dtype": dtype_names.get(e.get("dtype"), "float32"), "shape": e.get("shape")}
            for name, e in header.items()
            if isinstance(e, dict) and isinstance(e.get("dtype"), str)
        }
    try:
        manifest_bytes = _dump_manifest(manifest)
    except (ValueError, TypeError):
        return
    _must_not_crash(setup, _signed_container(setup, manifest_bytes, weights), also_inspect=False)


@settings(FUZZ, max_examples=100)
@given(tensors=st.dictionaries(
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"), min_size=1, max_size=12)
    .filter(lambda n: n != "__metadata__"),
    st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 3), max_size=3)),
    max_size=4,
))  # fmt: skip
def test_round_trip_of_arbitrary_tensor_sets(setup, tensors):
    made = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, (dtype, shape) in tensors.items()}
    path = setup["scratch"].with_name("roundtrip.relay")
    write_bundle(path, made, strategy="s", config={}, registry={}, site="SiteA", hop_started_utc="2024-05-01T08:00:00Z",
                 parent=None, signing_key=setup["key"], finished_utc="2024-05-01T09:00:00Z")  # fmt: skip
    loaded = read_bundle(path, trust=setup["trust"]).tensors
    assert set(loaded) == set(made)
    for name, tensor in made.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape


# ----- hardening cases: non-finite values, relay id, hop site bound to its signer ----------------


def test_bit_flips_in_float_weights_never_load_non_finite_values(setup):
    """Every bit of solver.w's data flipped (and the bundle re-signed with fixed hashes, as a trusted
    key could): values that become NaN/Inf are refused, every other flip loads finite tensors."""
    members = _members(setup)
    weights = members[WEIGHTS_NAME]
    header_len = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + header_len])
    begin, end = header["solver.w"]["data_offsets"]
    base = 8 + header_len + begin
    counts, start = Counter(), time.perf_counter()
    for position in range(base, base + (end - begin)):
        for bit in range(8):
            mutated = bytearray(weights)
            mutated[position] ^= 1 << bit
            manifest = json.loads(members[MANIFEST_NAME])
            manifest["weights_sha256"] = hashlib.sha256(mutated).hexdigest()
            data = _signed_container(setup, _dump_manifest(manifest), bytes(mutated))
            setup["scratch"].write_bytes(data)
            try:
                loaded = read_bundle(setup["scratch"], trust=setup["trust"])
            except VerificationError as exc:
                assert "NaN or infinite" in exc.message, exc.message
                counts["refused: non-finite"] += 1
                continue
            assert all(torch.isfinite(t).all() for t in loaded.tensors.values() if t.is_floating_point())
            counts["accepted: finite"] += 1
    _report("bit flips in float32 weights, re-signed", counts, time.perf_counter() - start)
    assert counts["refused: non-finite"] > 0 and counts["accepted: finite"] > 0


@FUZZ
@given(relay_id=_json, expected=st.sampled_from([None, "relay-a", "relay-b"]))
def test_signed_manifests_with_fuzzed_relay_ids(setup, relay_id, expected):
    manifest = json.loads(_members(setup)[MANIFEST_NAME])
    manifest["relay_id"] = relay_id
    try:
        manifest_bytes = _dump_manifest(manifest)
    except (ValueError, TypeError):
        return
    kind = outcome(setup, _signed_container(setup, manifest_bytes, _members(setup)[WEIGHTS_NAME]), expect_relay_id=expected)
    if kind == "accepted":
        assert isinstance(relay_id, str) and (expected is None or relay_id == expected)


@FUZZ
@given(site=st.text(min_size=1, max_size=12))
def test_signed_hops_naming_any_other_site_are_refused_when_bound(setup, site):
    manifest = json.loads(_members(setup)[MANIFEST_NAME])
    manifest["hops"][0]["site"] = site
    try:
        manifest_bytes = _dump_manifest(manifest)
    except (ValueError, TypeError):
        return
    kind = outcome(setup, _signed_container(setup, manifest_bytes, _members(setup)[WEIGHTS_NAME]), bind_sites=True)
    assert (kind == "accepted") == (site == "SiteA"), (site, kind)
