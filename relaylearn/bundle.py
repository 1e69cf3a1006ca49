"""The relay bundle: the one file that travels from site to site (docs/design.md#the-relay-bundle).

Format (``*.relay``, format version 1)
-------------------------------------
A ZIP container, members *stored* (not compressed), exactly these three, in this order:

1. ``manifest.json`` — UTF-8 JSON, pure ASCII, keys sorted, one-space indent, final newline
   (:func:`_dump_manifest` is the only accepted spelling). Fields: ``format``
   (``"relaylearn-bundle"``), ``format_version`` (1), ``signed``, ``software`` (relaylearn, torch,
   python versions), ``relay_id`` (fixed at the first hop, copied by every later one), ``strategy``, ``config``, ``registry`` (the strategy's JSON metadata),
   ``tensors`` (name → dtype, shape), ``weights_sha256``, ``weights_bytes``, ``hops`` (one entry per
   site visited: ``site`` (a pseudonym of letters, digits and ``-_.+``), ``order`` 1-based,
   ``started_utc``, ``finished_utc``, ``signer`` key fingerprint or null, ``parent_sha256`` =
   SHA-256 of the bundle file that hop started from, null for the first) and ``extra`` (only what
   the caller opted in, e.g. per-site image counts). Timestamps are ``YYYY-MM-DDTHH:MM:SSZ``.
2. ``weights.safetensors`` — every tensor, written by ``safetensors`` (no pickle, no metadata).
3. ``manifest.sig`` — the 64-byte Ed25519 signature over the exact bytes of ``manifest.json``, or,
   for an unsigned bundle (single-machine simulation), the 8 ASCII bytes ``UNSIGNED`` together
   with ``"signed": false`` in the manifest and ``signer: null`` in the last hop.

The container is *canonical*: fixed DOS timestamp 1980-01-01 00:00, version 2.0, no flags, no extra
fields, no comments, Unix mode 0644, no ZIP64 (so weights are capped just under 4 GiB). The reader
rebuilds every header from the member contents and requires the file to equal that byte for
byte. Hence every byte of the file is covered: header bytes by the canonical comparison, the
manifest by the signature (and CRC), the weights by their SHA-256 in the signed manifest, the
signature by Ed25519 verification. Identical inputs give identical files (Ed25519 is
deterministic); the file opens with any unzip tool (``unzip -p b.relay manifest.json``).

Only the last hop's signer is proven (by the signature); earlier hops' signers are what the
signed manifest records, and each hop's ``parent_sha256`` ties it to the exact file it started from.
With ``bind_sites`` (every command does this), a hop signed by a trusted key must name that key's
site. ``expect_relay_id`` refuses a bundle of another relay. Non-finite tensors are refused on
reading and on writing.

Reading (:func:`read_bundle`) checks, in order, failing with VerificationError (exit 3) and a
one-line reason: the file's size (a regular file, read once into memory); the container (members,
order, stored, size caps, declared sizes sum exactly to the file size *before* anything is read,
CRCs, canonical headers); the signature against the trusted keys *before* the manifest JSON is
parsed; the manifest's JSON, canonical spelling and schema; the hop chain; the weights (size and
SHA-256 against the signed manifest first, then the safetensors header, fully validated and equal
to the manifest's tensor index; a pickle or torch.save archive is named as such); optionally the
site ledger (rollback / fork protection, :class:`SiteLedger`). Only then are tensors materialised,
with ``safetensors.torch.load`` (which never unpickles). ``torch.load`` and pickle are never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, StringConstraints, ValidationError, field_validator
from safetensors import SafetensorError
from torch import Tensor

from relaylearn.errors import RelayError, UserError, VerificationError
from relaylearn.files import TIMESTAMP_FORMAT as _TIMESTAMP_FORMAT
from relaylearn.files import atomic_write, software_versions, utc_now
from relaylearn.keys import FINGERPRINT_PATTERN, RELAY_ID_PATTERN, SigningKey, TrustedKey, TrustStore

FORMAT = "relaylearn-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
SIGNATURE_NAME = "manifest.sig"
MEMBER_NAMES = (MANIFEST_NAME, WEIGHTS_NAME, SIGNATURE_NAME)
UNSIGNED_MARKER = b"UNSIGNED"
SIGNATURE_BYTES = 64

MAX_MANIFEST_BYTES = 1 << 20  # 1 MiB
MAX_SIGNATURE_BYTES = 1 << 10  # 1 KiB
#: the whole file must fit 32-bit ZIP offsets: 4 GiB minus room for manifest, signature, headers
MAX_WEIGHTS_BYTES = (1 << 32) - (4 << 20)
MAX_FILE_BYTES = (1 << 32) - 1
_MEMBER_CAPS = {MANIFEST_NAME: MAX_MANIFEST_BYTES, WEIGHTS_NAME: MAX_WEIGHTS_BYTES, SIGNATURE_NAME: MAX_SIGNATURE_BYTES}
_MAX_SAFETENSORS_HEADER = 16 << 20
MAX_TENSOR_DIMS = 8  # a network weight has at most 5 dimensions

#: torch dtype name (as written in the manifest) → (safetensors code, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint8": ("U8", 1), "bool": ("BOOL", 1),
}  # fmt: skip
_DTYPE_BY_CODE = {code: name for name, (code, _) in DTYPES.items()}

# ----- the canonical ZIP container -----------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes + name
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes + name
_END = struct.Struct("<IHHHHIIH")  # 22 bytes, no comment
_LOCAL_SIG, _CENTRAL_SIG, _END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_ZIP_VERSION = 20  # 2.0
_MADE_BY_UNIX = (3 << 8) | _ZIP_VERSION
_DOS_TIME, _DOS_DATE = 0, (0 << 9) | (1 << 5) | 1  # 1980-01-01 00:00:00
_EXTERNAL_ATTR = 0o100644 << 16  # regular file, rw-r--r--


def _container_parts(members: Sequence[tuple[str, bytes | memoryview]]) -> list[bytes | memoryview]:
    """The canonical container as a list: local header, data, ..., central directory, end record.

    Headers are at the even positions before the central directory; data parts are the members'
    own buffers (not copied).
    """
    parts: list[bytes | memoryview] = []
    central = []
    offset = 0
    for name, data in members:
        raw_name = name.encode("ascii")
        crc, size = zlib.crc32(data), len(data)
        fields = (_ZIP_VERSION, 0, 0, _DOS_TIME, _DOS_DATE, crc, size, size, len(raw_name))
        local = _LOCAL.pack(_LOCAL_SIG, *fields, 0) + raw_name
        entry = _CENTRAL.pack(_CENTRAL_SIG, _MADE_BY_UNIX, *fields, 0, 0, 0, 0, _EXTERNAL_ATTR, offset)
        central.append(entry + raw_name)
        parts += [local, data]
        offset += len(local) + size
    directory = b"".join(central)
    parts += [directory, _END.pack(_END_SIG, 0, 0, len(members), len(members), len(directory), offset, 0)]
    return parts


_MAX_REASON_CHARS = 300


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (control codes, escape sequences, bidi
    overrides, line breaks) written as a Python escape, so it is safe to print to a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _fail(reason: str, path: Path | str) -> VerificationError:
    """A VerificationError whose reason is one printable line, whatever untrusted text it quotes."""
    reason = escape_text(reason)
    if len(reason) > _MAX_REASON_CHARS:
        reason = reason[: _MAX_REASON_CHARS - 1] + "…"
    return VerificationError(reason, path)


def _end_record(tail: bytes | memoryview, size: int, path: Path) -> tuple[int, int, int]:
    """(members, central directory size, its offset) from the last ``_END.size`` bytes of a file of
    ``size`` bytes, or VerificationError. Cheap: :func:`_read_file` checks it before reading the rest."""
    if size < _END.size:
        raise _fail(f"not a relay bundle: only {size} bytes", path)
    sig, disk, cd_disk, on_disk, total, cd_size, cd_offset, comment = _END.unpack(tail)
    if sig != _END_SIG:
        raise _fail("not a relay bundle: no ZIP end record at the end of the file (truncated, padded or not a ZIP)", path)
    if disk or cd_disk or on_disk != total or comment:
        raise _fail("ZIP end record is not canonical (multi-disk, comment or inconsistent counts)", path)
    if total == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:
        raise _fail("ZIP64 containers are not relay bundles", path)
    if cd_offset + cd_size != size - _END.size:
        raise _fail("ZIP central directory does not end where the end record starts (truncated or padded)", path)
    if total * _CENTRAL.size > cd_size:
        raise _fail(f"ZIP end record claims {total} members but the central directory is only {cd_size} bytes", path)
    return total, cd_size, cd_offset


def _parse_container(data: memoryview, path: Path) -> dict[str, memoryview]:
    """The three members of a canonical container, or VerificationError saying what is wrong."""
    size = len(data)
    total, cd_size, cd_offset = _end_record(data[max(0, size - _END.size) :], size, path)

    entries = []  # (name, method, flags, crc, compressed, uncompressed)
    pos, end = cd_offset, cd_offset + cd_size
    for _ in range(total):
        if pos + _CENTRAL.size > end:
            raise _fail("ZIP central directory is truncated", path)
        fields = _CENTRAL.unpack(data[pos : pos + _CENTRAL.size])
        if fields[0] != _CENTRAL_SIG:
            raise _fail(f"ZIP central directory entry at byte {pos} is corrupt", path)
        flags, method, crc, compressed, uncompressed = fields[3], fields[4], fields[7], fields[8], fields[9]
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        name_end = pos + _CENTRAL.size + name_len
        if name_end + extra_len + comment_len > end:
            raise _fail("ZIP central directory entry runs past its end", path)
        name = bytes(data[pos + _CENTRAL.size : name_end]).decode("utf-8", errors="replace")
        entries.append((name, method, flags, crc, compressed, uncompressed))
        pos = name_end + extra_len + comment_len
    if pos != end:
        raise _fail("ZIP central directory has trailing bytes", path)

    names = [entry[0] for entry in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(f"duplicate member {duplicates[0]!r}", path)
    unexpected = [n for n in names if n not in MEMBER_NAMES]
    if unexpected:
        raise _fail(f"unexpected member {unexpected[0]!r} (a bundle holds exactly {', '.join(MEMBER_NAMES)})", path)
    missing = [n for n in MEMBER_NAMES if n not in names]
    if missing:
        raise _fail(f"missing member {missing[0]!r}", path)
    if tuple(names) != MEMBER_NAMES:
        raise _fail(f"members are not in the canonical order {', '.join(MEMBER_NAMES)}", path)

    expected_size = cd_size + _END.size
    for name, method, flags, _crc, compressed, uncompressed in entries:
        if method != zipfile.ZIP_STORED:
            raise _fail(f"member {name!r} is compressed (method {method}); bundle members must be stored", path)
        if flags & 0x1:
            raise _fail(f"member {name!r} is encrypted", path)
        if compressed != uncompressed:
            raise _fail(f"member {name!r} declares inconsistent sizes", path)
        if uncompressed > _MEMBER_CAPS[name]:
            raise _fail(f"member {name!r} declares {uncompressed} bytes, over its limit of {_MEMBER_CAPS[name]}", path)
        expected_size += _LOCAL.size + len(name) + uncompressed
    if expected_size != size:
        raise _fail(
            f"declared member sizes add up to {expected_size} bytes but the file has {size} (truncated or tampered)",
            path,
        )

    members: dict[str, memoryview] = {}
    pos = 0
    for name, _method, _flags, crc, _compressed, length in entries:
        start = pos + _LOCAL.size + len(name)
        members[name] = data[start : start + length]
        if zlib.crc32(members[name]) != crc:
            raise _fail(f"CRC mismatch in member {name!r} (corrupted)", path)
        pos = start + length

    pos = 0
    for index, part in enumerate(_container_parts([(name, members[name]) for name in MEMBER_NAMES])):
        is_data = index < 2 * len(MEMBER_NAMES) and index % 2 == 1
        if not is_data and data[pos : pos + len(part)] != part:
            differing = next(i for i in range(len(part)) if pos + i >= size or data[pos + i] != part[i])
            raise _fail(f"container is not in the canonical form written by relaylearn (byte {pos + differing})", path)
        pos += len(part)
    return members


# ----- the manifest -------------------------------------------------------------------------

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
UtcTimestamp = Annotated[str, StringConstraints(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")]
#: a hop's site: a key's site name, or several joined by '+' (a pooled "joint" hop)
HOP_SITE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,255}"
SiteName = Annotated[str, StringConstraints(pattern=f"^{HOP_SITE_PATTERN}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=f"^{FINGERPRINT_PATTERN}$")]
TensorName = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,512}$")]
RelayId = Annotated[str, StringConstraints(pattern=f"^{RELAY_ID_PATTERN}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SoftwareVersions(_Strict):
    relaylearn: Annotated[str, StringConstraints(max_length=64)]
    torch: Annotated[str, StringConstraints(max_length=64)]
    python: Annotated[str, StringConstraints(max_length=64)]


class TensorEntry(_Strict):
    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]
    shape: list[NonNegativeInt]


class Hop(_Strict):
    site: SiteName
    order: PositiveInt
    started_utc: UtcTimestamp
    finished_utc: UtcTimestamp
    signer: Fingerprint | None
    parent_sha256: Sha256Hex | None

    @field_validator("started_utc", "finished_utc")
    @classmethod
    def _real_time(cls, value: str) -> str:
        datetime.strptime(value, _TIMESTAMP_FORMAT)
        return value


class Manifest(_Strict):
    """Schema of ``manifest.json`` (format version 1)."""

    format: Literal["relaylearn-bundle"]
    format_version: Literal[1]
    signed: bool
    software: SoftwareVersions
    relay_id: RelayId
    strategy: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    config: dict[str, Any]
    registry: dict[str, Any]
    tensors: dict[TensorName, TensorEntry]
    weights_sha256: Sha256Hex
    weights_bytes: NonNegativeInt
    hops: list[Hop] = Field(min_length=1)
    extra: dict[str, Any]

    @field_validator("tensors")
    @classmethod
    def _no_reserved_name(cls, value: dict) -> dict:
        if "__metadata__" in value:
            raise ValueError("'__metadata__' is reserved by safetensors")
        return value


def _dump_manifest(manifest: dict) -> bytes:
    """The one accepted spelling of a manifest (raises ValueError/TypeError if not JSON-able)."""
    text = json.dumps(manifest, sort_keys=True, ensure_ascii=True, allow_nan=False, indent=1, separators=(",", ": "))
    return (text + "\n").encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_manifest(raw: memoryview, path: Path) -> dict:
    """Decode, parse, validate and check the canonical spelling of ``manifest.json``."""
    raw_bytes = bytes(raw)
    try:
        manifest = json.loads(raw_bytes.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _fail("manifest.json is not valid UTF-8", path) from None
    except (ValueError, RecursionError) as exc:
        raise _fail(f"manifest.json is not valid JSON ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(manifest, dict):
        raise _fail("manifest.json is not a JSON object", path)
    if manifest.get("format") != FORMAT:
        raise _fail(f"not a relay bundle: manifest format is {manifest.get('format')!r}", path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise _fail(
            f"unsupported bundle format_version {manifest.get('format_version')!r} (this relaylearn reads {FORMAT_VERSION})",
            path,
        )
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "(top level)"
        raise _fail(f"manifest.json: {where}: {error['msg']}", path) from None
    try:
        canonical = _dump_manifest(manifest) == raw_bytes
    except (ValueError, TypeError, RecursionError, UnicodeError):
        canonical = False
    if not canonical:
        raise _fail("manifest.json is not in canonical form (sorted keys, fixed layout, no duplicates)", path)
    _check_hops(manifest, path)
    return manifest


def _check_hops(manifest: dict, path: Path) -> None:
    hops = manifest["hops"]
    for position, hop in enumerate(hops, start=1):
        if hop["order"] != position:
            raise _fail(f"hop chain is broken: hop {position} has order {hop['order']}", path)
        if (hop["parent_sha256"] is None) != (position == 1):
            raise _fail(
                "hop chain is broken: " + ("the first hop has a parent" if position == 1 else f"hop {position} names no parent bundle"),
                path,
            )
    last_signer = hops[-1]["signer"]
    if manifest["signed"] and last_signer is None:
        raise _fail("manifest says signed but the last hop names no signer", path)
    if not manifest["signed"] and last_signer is not None:
        raise _fail("manifest says unsigned but the last hop names a signer", path)


# ----- the weights --------------------------------------------------------------------------


def _foreign_format(head: bytes) -> str | None:
    """Name the usual suspects for a weights member that is not safetensors (diagnostics only: a
    valid safetensors file may itself start with 0x80, when its header is 128 bytes long)."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "holds a pickle"
    if head[:4] == b"PK\x03\x04":
        return "is a ZIP / torch.save archive"
    return None


class _DuplicateKey(Exception):
    """A JSON object names a key twice (``json.loads`` would keep the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_safetensors_index(weights: memoryview, path: Path) -> dict[str, dict]:
    """Validate a safetensors buffer without materialising tensors; return name → {dtype, shape}.

    The header must be a JSON object of tensors only (no ``__metadata__``), with known dtypes and
    data offsets that tile the data area exactly, each matching its dtype and shape.
    """
    head = bytes(weights[:8])
    header_len = int.from_bytes(head, "little")
    if len(weights) < 8 or header_len > min(len(weights) - 8, _MAX_SAFETENSORS_HEADER):
        suspect = _foreign_format(head)
        if suspect:
            raise _fail(f"weights.safetensors {suspect} (refused; bundles never contain pickles)", path)
        if len(weights) < 8:
            raise _fail("weights.safetensors is too short", path)
        raise _fail(f"weights.safetensors header length {header_len} is impossible", path)
    try:
        header = json.loads(bytes(weights[8 : 8 + header_len]).decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise _fail(f"weights.safetensors header names tensor {exc.args[0]!r} twice", path) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _fail("weights.safetensors header is not valid UTF-8 JSON", path) from None
    if not isinstance(header, dict):
        raise _fail("weights.safetensors header is not a JSON object", path)
    if "__metadata__" in header:
        raise _fail("weights.safetensors carries __metadata__ (bundles never do)", path)

    index: dict[str, dict] = {}
    spans = []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise _fail(f"weights.safetensors entry {name!r} is malformed", path)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        # bounded before any arithmetic: math.prod over a long list of big ints is quadratic
        valid_shape = isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(type(d) is int and 0 <= d <= MAX_WEIGHTS_BYTES for d in shape)
        valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if dtype not in _DTYPE_BY_CODE or not valid_shape or not valid_offsets:
            raise _fail(f"weights.safetensors entry {name!r} is malformed", path)
        dtype_name = _DTYPE_BY_CODE[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype_name][1]:
            raise _fail(f"weights.safetensors entry {name!r}: data size does not match its dtype and shape", path)
        spans.append((offsets[0], offsets[1]))
        index[name] = {"dtype": dtype_name, "shape": shape}
    cursor = 0
    for begin, end in sorted(spans):
        if begin != cursor:
            raise _fail("weights.safetensors tensors overlap or leave gaps", path)
        cursor = end
    if cursor != len(weights) - 8 - header_len:
        raise _fail("weights.safetensors data area does not match its header", path)
    return index


def _describe(entry: dict | None) -> str:
    return "absent" if entry is None else f"{entry['dtype']}{entry['shape']}"


def _compare_index(manifest_index: dict, weights_index: dict, path: Path) -> None:
    if manifest_index == weights_index:
        return
    for name in sorted(set(manifest_index) | set(weights_index)):
        if manifest_index.get(name) != weights_index.get(name):
            raise _fail(
                f"tensor index of manifest.json disagrees with weights.safetensors at {name!r}: "
                f"manifest {_describe(manifest_index.get(name))}, weights {_describe(weights_index.get(name))}",
                path,
            )


# ----- checking a bundle --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Bundle:
    """A bundle that passed every check. ``sha256`` is the hash of the whole file (hex)."""

    path: Path
    sha256: str
    manifest: dict
    tensors: dict[str, Tensor]
    signed_by: str | None  # trusted site name; None when unsigned or the signature was not checked

    @property
    def hops(self) -> list[dict]:
        return self.manifest["hops"]

    @property
    def lineage(self) -> list[str]:
        """SHA-256 of every bundle of this chain, oldest first, ending with this one."""
        return _lineage(self.manifest, self.sha256)

    @property
    def strategy(self) -> str:
        return self.manifest["strategy"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def registry(self) -> dict:
        return self.manifest["registry"]

    @property
    def extra(self) -> dict:
        return self.manifest["extra"]

    @property
    def signer_fingerprint(self) -> str | None:
        return self.hops[-1]["signer"]


def _lineage(manifest: dict, sha256: str) -> list[str]:
    return [hop["parent_sha256"] for hop in manifest["hops"][1:]] + [sha256]


@dataclass(frozen=True)
class _Checked:
    path: Path
    size: int
    sha256: str
    manifest: dict
    weights: memoryview
    signer: TrustedKey | None


_CHECK = "signature"
_NO_CHECK = "structure"


def _read_file(path: Path) -> bytes:
    """The whole file, read once: every check and the final load use these same bytes, so the
    medium cannot change what is loaded after it was checked. Only regular files are read."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise _fail("not a regular file", path)
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _fail("not a regular file", path)
            if info.st_size > MAX_FILE_BYTES:
                raise _fail(f"file is {info.st_size} bytes, larger than any relay bundle can be", path)
            if info.st_size >= _END.size:  # a file without a bundle's end record is refused before it is read
                handle.seek(info.st_size - _END.size)
                _end_record(handle.read(_END.size), info.st_size, path)
                handle.seek(0)
            data = handle.read(info.st_size + 1)
    except OSError as exc:
        raise _fail(f"cannot read bundle: {exc.strerror or exc}", path) from None
    if len(data) != info.st_size:
        raise _fail("file changed while it was being read", path)
    return data


def _authenticate(manifest_raw: memoryview, signature: bytes, *, trust: TrustStore | None, allow_unsigned: bool, path: Path) -> TrustedKey | None:
    """The trusted key whose signature covers the manifest (checked before the JSON is parsed)."""
    if signature == UNSIGNED_MARKER:
        if not allow_unsigned:
            raise _fail(
                "bundle is unsigned; unsigned bundles are accepted only in a one-machine simulation, or for testing: by train --insecure-unsigned, by test/predict/export/audit --no-verify",
                path,
            )
        return None
    if trust is None:
        if allow_unsigned:
            return None  # signature present but, by the caller's choice, not checked
        raise _fail("bundle is signed but no trusted keys were given (--trust DIR)", path)
    data = bytes(manifest_raw)
    for key in trust:
        if key.verifies(signature, data):
            return key
    claimed = _claimed_signer(data)
    if claimed and re.fullmatch(FINGERPRINT_PATTERN, claimed) and claimed not in trust:
        raise _fail(f"signed by an untrusted key {claimed} (not in the trust folder)", path)
    raise _fail("signature does not verify with any trusted key (manifest altered after signing, or untrusted signer)", path)


def _claimed_signer(manifest_raw: bytes) -> str | None:
    """Best effort, for the error message only: the signer an (unauthenticated) manifest claims."""
    try:
        signer = json.loads(manifest_raw.decode("utf-8"))["hops"][-1]["signer"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None
    return signer if isinstance(signer, str) else None


def _check_bundle(path: Path, *, trust: TrustStore | None, allow_unsigned: bool, mode: str) -> _Checked:
    data = _read_file(path)
    view = memoryview(data)
    try:
        members = _parse_container(view, path)
        signature = bytes(members[SIGNATURE_NAME])
        if signature != UNSIGNED_MARKER and len(signature) != SIGNATURE_BYTES:
            raise _fail(
                f"manifest.sig holds {len(signature)} bytes: neither a 64-byte Ed25519 signature nor the UNSIGNED marker",
                path,
            )
        signer = None
        if mode == _CHECK:
            signer = _authenticate(members[MANIFEST_NAME], signature, trust=trust, allow_unsigned=allow_unsigned, path=path)
        manifest = _parse_manifest(members[MANIFEST_NAME], path)
        if manifest["signed"] != (signature != UNSIGNED_MARKER):
            raise _fail("manifest 'signed' flag disagrees with manifest.sig", path)
        if signer is not None and manifest["hops"][-1]["signer"] != signer.fingerprint:
            raise _fail(
                f"last hop names signer {manifest['hops'][-1]['signer']} but the bundle was signed by {signer.fingerprint} ({signer.site})",
                path,
            )
        weights = members[WEIGHTS_NAME]
        weights_hash = hashlib.sha256(weights).hexdigest()
        if len(weights) != manifest["weights_bytes"] or weights_hash != manifest["weights_sha256"]:
            suspect = _foreign_format(bytes(weights[:8]))
            raise _fail(
                "SHA-256 of weights.safetensors does not match the manifest (weights altered" + (f"; the member {suspect})" if suspect else ")"),
                path,
            )
        _compare_index(manifest["tensors"], _parse_safetensors_index(weights, path), path)
    except VerificationError:
        raise
    except (struct.error, ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, EOFError,
            NotImplementedError, zipfile.BadZipFile) as exc:  # fmt: skip
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(f"malformed bundle ({type(exc).__name__}: {detail})", path) from None
    return _Checked(path, len(data), hashlib.sha256(view).hexdigest(), manifest, weights, signer)


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _load_tensors(checked: _Checked) -> dict[str, Tensor]:
    try:
        tensors = safetensors.torch.load(bytes(checked.weights))
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:
        raise _fail(f"weights.safetensors could not be loaded ({str(exc).splitlines()[0]})", checked.path) from None
    for name, entry in checked.manifest["tensors"].items():
        tensor = tensors.get(name)
        loaded = None if tensor is None else {"dtype": _dtype_name(tensor), "shape": list(tensor.shape)}
        if loaded != entry:
            raise _fail(f"tensor {name!r} loaded with a dtype or shape other than the manifest's", checked.path)
        if _non_finite(tensor):
            raise _fail(f"tensor {name!r} holds NaN or infinite values (refused)", checked.path)
        if tensor.dtype == torch.bool and tensor.numel() and int(tensor.view(torch.uint8).max()) > 1:
            raise _fail(f"tensor {name!r} is bool but holds bytes other than 0 and 1 (refused)", checked.path)
    return tensors


def _non_finite(tensor: Tensor) -> bool:
    return bool(tensor.is_floating_point() and tensor.numel() and not torch.isfinite(tensor).all())


def existing_bundle(path: str | Path) -> Path:
    """The bundle file a command was given; a path that is not a file is bad input (UserError,
    exit 2), not a failed verification (exit 3)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("is a folder, not a bundle file" if path.is_dir() else "bundle not found" if not path.exists() else "bundle is not a file", path)
    return path


def read_bundle(
    path: str | Path,
    *,
    trust: TrustStore | None,
    allow_unsigned: bool = False,
    ledger: SiteLedger | None = None,
    expect_parent_sha256: str | None = None,
    expect_relay_id: str | None = None,
    bind_sites: bool = False,
) -> Bundle:
    """Verify the bundle at ``path`` completely, then load its tensors.

    - A signed bundle must verify with a key of ``trust``. With ``trust=None`` it is accepted only
      when ``allow_unsigned`` (its signature then counts as not checked: ``signed_by`` is None).
    - An unsigned bundle is accepted only with ``allow_unsigned=True``.
    - ``ledger``: also require that the chain extends what this site last saw
      (:meth:`SiteLedger.check`; the ledger is not updated — call ``ledger.record``).
    - ``expect_parent_sha256``: require the last hop to have started from that bundle.
    - ``expect_relay_id``: require the bundle to belong to that relay (checked before the ledger).
    - ``bind_sites``: require every hop signed by a key of ``trust`` to name that key's site (the
      last hop's signer is proven by the signature; earlier ones are what the signed manifest says).

    Raises VerificationError (exit code 3) with a one-line reason on any failure.
    """
    path = Path(path)
    checked = _check_bundle(path, trust=trust, allow_unsigned=allow_unsigned, mode=_CHECK)
    if expect_parent_sha256 is not None and checked.manifest["hops"][-1]["parent_sha256"] != expect_parent_sha256:
        raise _fail(f"bundle does not continue the expected parent bundle {expect_parent_sha256[:16]}…", path)
    if expect_relay_id is not None and checked.manifest["relay_id"] != expect_relay_id:
        raise _fail(
            f"bundle belongs to relay '{checked.manifest['relay_id']}' but this site is in relay '{expect_relay_id}'",
            path,
        )
    if bind_sites and trust is not None:
        _check_hop_signers(checked.manifest["hops"], trust, path)
    if ledger is not None:
        ledger.check_lineage(_lineage(checked.manifest, checked.sha256), path)
    tensors = _load_tensors(checked)
    return Bundle(path, checked.sha256, checked.manifest, tensors, checked.signer.site if checked.signer else None)


def _check_hop_signers(hops: list[dict], trust: TrustStore, path: Path) -> None:
    """Each hop whose signer is a trusted key must name that key's site."""
    for hop in hops:
        key = trust.get(hop["signer"]) if hop["signer"] else None
        if key is not None and hop["site"] != key.site:
            raise _fail(
                f"hop {hop['order']} names site '{hop['site']}' but was signed by the key of site '{key.site}' ({key.fingerprint})",
                path,
            )


def verify_bundle(path: str | Path, trust: TrustStore, *, expect_relay_id: str | None = None) -> Bundle:
    """Full verification against ``trust`` (a signature is required, hops bound to their signers'
    sites); see :func:`read_bundle`."""
    return read_bundle(path, trust=trust, allow_unsigned=False, expect_relay_id=expect_relay_id, bind_sites=True)


# ----- writing ------------------------------------------------------------------------------


def _prepare_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies (copies also untie shared storage, which safetensors refuses)."""
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or len(name) > 512 or name == "__metadata__" or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            raise ValueError(f"tensor name {name!r} cannot go into a bundle")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"bundle entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if _dtype_name(tensor) not in DTYPES or tensor.layout != torch.strided or tensor.is_quantized:
            raise ValueError(f"tensor {name!r} ({tensor.dtype}, {tensor.layout}) cannot go into a bundle")
        prepared[name] = tensor.detach().to("cpu").contiguous().clone()
        if _non_finite(prepared[name]):
            raise RelayError(f"refusing to write a bundle: tensor {escape_text(name)!r} holds NaN or infinite values (training diverged?)")
    return prepared


def _json_section(value: Any, what: str) -> Any:
    """``value`` as it will read back from JSON; UserError if it is not JSON-representable."""
    try:
        return json.loads(json.dumps(value, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise UserError(f"bundle {what} cannot be written as JSON: {exc}") from None


def write_bundle(
    path: str | Path,
    tensors: Mapping[str, Tensor],
    *,
    strategy: str,
    config: dict,
    registry: dict,
    site: str,
    hop_started_utc: str,
    parent: Bundle | None,
    signing_key: SigningKey | None,
    extra: dict | None = None,
    finished_utc: str | None = None,
    relay_id: str | None = None,
) -> Path:
    """Write a bundle holding ``tensors`` and one new hop for ``site``; return ``path``.

    ``config``, ``registry`` and ``extra`` must be JSON-representable dicts (UserError otherwise);
    ``extra`` should hold only what the config opted in to share (per-site counts, metrics).
    ``parent`` is the bundle this site started from (None at the first site); its hops are copied
    and the new hop records its file SHA-256. Without ``signing_key`` the bundle is unsigned.
    ``relay_id`` names the relay: fixed at the first hop (default: derived from that hop's site,
    start time and weights) and copied from ``parent`` afterwards (a different value is refused).
    ``finished_utc`` defaults to now; timestamps are ``YYYY-MM-DDTHH:MM:SSZ`` (see :func:`utc_now`).
    The file appears atomically; identical arguments give identical bytes.
    """
    path = Path(path)
    if not isinstance(site, str) or not re.fullmatch(HOP_SITE_PATTERN, site):
        raise UserError(f"invalid site name {site!r} for the bundle's hop: use letters, digits and '-_.+'")
    finished_utc = utc_now() if finished_utc is None else finished_utc
    for what, stamp in (("hop_started_utc", hop_started_utc), ("finished_utc", finished_utc)):
        try:
            datetime.strptime(stamp, _TIMESTAMP_FORMAT)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must look like 2024-05-01T12:00:00Z, got {stamp!r}") from None
    prepared = _prepare_tensors(tensors)
    weights = safetensors.torch.save(prepared)
    if len(weights) > MAX_WEIGHTS_BYTES:
        raise UserError(f"weights take {len(weights)} bytes, over the bundle limit of {MAX_WEIGHTS_BYTES}", path)

    if parent is not None:
        if relay_id is not None and relay_id != parent.manifest["relay_id"]:
            raise UserError(f"relay id {relay_id!r} differs from the parent bundle's {parent.manifest['relay_id']!r}")
        relay_id = parent.manifest["relay_id"]
    elif relay_id is None:
        seed = f"{site}\n{hop_started_utc}\n{hashlib.sha256(weights).hexdigest()}".encode()
        relay_id = "relay-" + hashlib.sha256(seed).hexdigest()[:16]
    if not re.fullmatch(RELAY_ID_PATTERN, relay_id):
        raise UserError(f"invalid relay id {relay_id!r}: use 1-64 letters, digits, '-', '_' or '.'")
    hops = list(parent.manifest["hops"]) if parent is not None else []
    hops.append({
        "site": site,
        "order": len(hops) + 1,
        "started_utc": hop_started_utc,
        "finished_utc": finished_utc,
        "signer": signing_key.fingerprint if signing_key is not None else None,
        "parent_sha256": parent.sha256 if parent is not None else None,
    })  # fmt: skip
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "signed": signing_key is not None,
        "software": software_versions(),
        "relay_id": relay_id,
        "strategy": strategy,
        "config": _json_section(config, "config"),
        "registry": _json_section(registry, "registry"),
        "tensors": {name: {"dtype": _dtype_name(t), "shape": list(t.shape)} for name, t in prepared.items()},
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "weights_bytes": len(weights),
        "hops": hops,
        "extra": _json_section(extra or {}, "extra"),
    }
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ValueError(f"bundle manifest field {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    manifest_bytes = _dump_manifest(manifest)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise UserError(f"manifest would take {len(manifest_bytes)} bytes, over the limit of {MAX_MANIFEST_BYTES}", path)
    signature = signing_key.sign(manifest_bytes) if signing_key is not None else UNSIGNED_MARKER
    members = [(MANIFEST_NAME, manifest_bytes), (WEIGHTS_NAME, weights), (SIGNATURE_NAME, signature)]
    atomic_write(path, _container_parts(members))
    return path


#: what one more hop may add to a manifest (its hop entry, the site's registry entries, a local
#: recipe's config): an incoming bundle must leave this much room under MAX_MANIFEST_BYTES
NEXT_HOP_MANIFEST_ROOM = 64 << 10


def check_room_for_next_hop(bundle: Bundle) -> None:
    """Before training on ``bundle``: VerificationError (exit 3) naming it when its manifest leaves
    too little room under the size limit for the bundle this site will write (which would fail only
    after the whole hop had trained)."""
    size = len(_dump_manifest(bundle.manifest))
    if size > MAX_MANIFEST_BYTES - NEXT_HOP_MANIFEST_ROOM:
        raise VerificationError(
            f"manifest takes {size} bytes, which leaves no room for the next hop under the limit of {MAX_MANIFEST_BYTES} "
            f"(at most {MAX_MANIFEST_BYTES - NEXT_HOP_MANIFEST_ROOM} bytes are accepted for training)",
            bundle.path,
        )


# ----- inspection ---------------------------------------------------------------------------


def inspect_bundle(path: str | Path) -> dict:
    """Describe a bundle without any trusted key.

    The container, manifest, hop chain, weights hash and safetensors header are checked
    (VerificationError otherwise) but the signature is *not*: ``signature`` is ``"not checked"``
    (or ``"absent"`` for an unsigned bundle) and ``signer`` is the fingerprint the manifest claims.
    ``total_parameters`` counts every tensor element (parameters and buffers).
    """
    path = Path(path)
    checked = _check_bundle(path, trust=None, allow_unsigned=True, mode=_NO_CHECK)
    manifest = checked.manifest
    networks: dict[str, dict[str, int]] = {}
    for name, entry in manifest["tensors"].items():
        prefix = name.split(".", 1)[0]
        elements = math.prod(entry["shape"])
        net = networks.setdefault(prefix, {"tensors": 0, "parameters": 0, "bytes": 0})
        net["tensors"] += 1
        net["parameters"] += elements
        net["bytes"] += elements * DTYPES[entry["dtype"]][1]
    return {
        "path": str(path),
        "file_bytes": checked.size,
        "sha256": checked.sha256,
        "format_version": manifest["format_version"],
        "software": manifest["software"],
        "relay_id": manifest["relay_id"],
        "strategy": manifest["strategy"],
        "signed": manifest["signed"],
        "signature": "not checked" if manifest["signed"] else "absent",
        "signer": manifest["hops"][-1]["signer"],
        "hops": manifest["hops"],
        "config": manifest["config"],
        "registry": manifest["registry"],
        "extra": manifest["extra"],
        "tensor_count": len(manifest["tensors"]),
        "total_parameters": sum(net["parameters"] for net in networks.values()),
        "weights_bytes": manifest["weights_bytes"],
        "weights_sha256": manifest["weights_sha256"],
        "networks": dict(sorted(networks.items())),
    }


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.2f} MB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def format_inspect(info: dict) -> str:
    """A human-readable summary of :func:`inspect_bundle`'s result (sizes in MB = 10^6 bytes).

    Every line is passed through :func:`escape_text`: the manifest's strings (strategy, software
    versions, extra keys) are untrusted and must not reach the terminal as control sequences."""
    software = info["software"]
    if info["signed"]:
        signature = f"signed by {info['signer']} (NOT checked here; use 'relaylearn verify BUNDLE --trust DIR')"
    else:
        signature = "UNSIGNED (simulation bundle; accepted only by train --insecure-unsigned, test/predict/export/audit --no-verify)"
    lines = [
        f"Relay bundle {info['path']}",
        f"  size        {_mb(info['file_bytes'])} ({info['file_bytes']:,} bytes)",
        f"  sha256      {info['sha256']}",
        f"  format      relaylearn-bundle v{info['format_version']} (relaylearn {software['relaylearn']}, "
        f"torch {software['torch']}, python {software['python']})",
        f"  relay       {info['relay_id']}",
        f"  strategy    {info['strategy']}",
        f"  signature   {signature}",
        f"  tensors     {info['tensor_count']:,} tensors, {info['total_parameters']:,} elements, {_mb(info['weights_bytes'])} of weights",
        "",
        "Hops",
    ]
    hop_rows = [
        [hop["order"], hop["site"], hop["started_utc"], hop["finished_utc"], hop["signer"] or "unsigned",
         (hop["parent_sha256"] or "-")[:16]]
        for hop in info["hops"]
    ]  # fmt: skip
    lines += _table(["#", "site", "started (UTC)", "finished (UTC)", "signer", "parent sha256"], hop_rows, {0})
    lines += ["", "Networks (tensor name prefix)"]
    net_rows = [[prefix, f"{net['tensors']:,}", f"{net['parameters']:,}", f"{net['bytes'] / 1e6:,.2f}"] for prefix, net in info["networks"].items()]
    lines += _table(["prefix", "tensors", "elements", "MB"], net_rows, {1, 2, 3})
    if info["extra"]:
        lines += ["", "Extra (opted in by the config)"]
        lines += [f"  {key}: {json.dumps(value, sort_keys=True)}" for key, value in sorted(info["extra"].items())]
    return "\n".join(escape_text(line) for line in lines)


# ----- rollback protection ------------------------------------------------------------------

LEDGER_FORMAT = "relaylearn-site-ledger"


class SiteLedger:
    """What this site last saw of the relay, to refuse silent rollbacks and forks.

    The ledger is a small JSON file kept at the site (e.g. ``exps/<config>/<name>/ledger.json``,
    one per relay run) holding the *lineage* of the last bundle this site received or wrote: the
    SHA-256 of every bundle of its chain, oldest first (the hops' ``parent_sha256`` values, then
    the bundle's own file hash), and whether that bundle was ``received`` or ``written`` here.

    Rule (:meth:`check`), with L the stored lineage and N the incoming bundle's lineage:

    - no ledger yet: accept (trust on first use);
    - N strictly extends L (L is a proper prefix of N): accept — the relay moved forward;
    - N equals L and that bundle was *received* here: accept — the same bundle read again, e.g.
      training restarted after a crash;
    - N equals L and this site *wrote* it: refuse — a site takes its own bundle back only after
      another hop was added ("accepted back only if newer");
    - N is a proper prefix of L: refuse as a rollback; otherwise refuse as a fork.

    :meth:`record` stores a bundle's lineage; it refuses to move the ledger backwards or sideways.
    A single-machine simulation that writes and re-reads its own bundles should not share one ledger
    between the writing and reading roles (record only received bundles, or use none). Deleting the
    ledger resets the protection: keep it with the run's other files, writable only by the site.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _load(self) -> tuple[list[str], str] | None:
        if not self.path.exists():
            return None
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            lineage, last = state["lineage"], state["last"]
            if (
                state["format"] != LEDGER_FORMAT
                or last not in ("received", "written")
                or not isinstance(lineage, list)
                or not lineage
                or not all(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h) for h in lineage)
            ):
                raise ValueError("unexpected content")
        except RecursionError:
            raise UserError("site ledger is unreadable (nested too deeply); restore it, or delete it to start over", self.path) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"site ledger is unreadable ({exc}); restore it, or delete it to start over", self.path) from None
        return lineage, last

    def lineage(self) -> list[str]:
        """The stored lineage ([] when the ledger does not exist yet)."""
        state = self._load()
        return state[0] if state else []

    def _problem(self, incoming: list[str], *, allow_equal_written: bool) -> str | None:
        state = self._load()
        if state is None:
            return None
        stored, last = state
        if len(incoming) > len(stored) and incoming[: len(stored)] == stored:
            return None
        if incoming == stored:
            if last == "received" or allow_equal_written:
                return None
            return f"this site wrote this bundle itself (hop {len(stored)}) and no site has trained on it since"
        if len(incoming) < len(stored) and stored[: len(incoming)] == incoming:
            return f"rollback: this bundle (hop {len(incoming)}) is older than the one this site last saw (hop {len(stored)}, sha256 {stored[-1][:16]}…)"
        common = next((i for i, (a, b) in enumerate(zip(incoming, stored)) if a != b), min(len(incoming), len(stored)))
        return f"fork: this bundle's chain diverges at hop {common + 1} from the one this site last saw"

    def knows(self, lineage: list[str]) -> bool:
        """The stored lineage is ``lineage`` or extends it (this site has seen that bundle)."""
        stored = self.lineage()
        return len(stored) >= len(lineage) and stored[: len(lineage)] == lineage

    def check_lineage(self, lineage: list[str], path: str | Path | None = None) -> None:
        """VerificationError (naming the bundle file ``path``) unless a bundle of ``lineage`` may be
        accepted here (rule in the class doc)."""
        problem = self._problem(lineage, allow_equal_written=False)
        if problem:
            raise VerificationError(f"{problem} (site ledger {self.path})", path)

    def check(self, bundle: Bundle) -> None:
        """Raise VerificationError unless ``bundle`` may be accepted here (rule in the class doc)."""
        self.check_lineage(bundle.lineage, bundle.path)

    def record(self, bundle: Bundle | str | Path, *, written: bool = False) -> None:
        """Store ``bundle`` (a Bundle, or the path of one this site just wrote) as last seen.

        ``written=True`` marks a bundle this site wrote. A path is checked structurally (not its
        signature: pass bundles from elsewhere through :func:`read_bundle` first).
        """
        if isinstance(bundle, Bundle):
            lineage = bundle.lineage
        else:
            checked = _check_bundle(Path(bundle), trust=None, allow_unsigned=True, mode=_NO_CHECK)
            lineage = _lineage(checked.manifest, checked.sha256)
        problem = self._problem(lineage, allow_equal_written=True)
        if problem:
            raise VerificationError(f"cannot record: {problem} (site ledger {self.path})")
        state = {
            "format": LEDGER_FORMAT,
            "version": 1,
            "lineage": lineage,
            "last": "written" if written else "received",
            "updated_utc": utc_now(),
        }
        atomic_write(self.path, [(json.dumps(state, indent=1, sort_keys=True) + "\n").encode("ascii")])
