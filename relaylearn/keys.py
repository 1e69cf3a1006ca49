"""Site signing keys (Ed25519) and the folder of trusted public keys (docs/design.md#the-relay-bundle).

A site has one key pair, made with ``relaylearn keygen``:

- ``<site>.key``: the private key, PKCS8 PEM, unencrypted, file mode 0600. It never leaves the
  site. It is refused, like ssh refuses, when group or others may read it.
- ``<site>.pub``: the public key (SubjectPublicKeyInfo PEM). It is handed to the other sites,
  which put it into their trust folder (``--trust DIR``).

The file stem is the site's name: letters, digits and ``-_.``, starting with a letter or digit,
at most 64 characters. ``keygen`` also writes the name into both files, after the PEM block, as a
line ``relaylearn-site: <site>``: a key is bound to the site it was made for, and renaming the file
does not rename the site (a mismatch is refused). A signed hop must name its signer's site. Keys are identified by their *fingerprint*, ``"SHA256:"`` followed by the
first 32 hex digits (128 bits) of the SHA-256 of the raw 32-byte Ed25519 public key.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from relaylearn.errors import UserError
from relaylearn.files import atomic_write

SITE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_SITE_NAME_RE = re.compile(SITE_NAME_PATTERN)
FINGERPRINT_PATTERN = r"SHA256:[0-9a-f]{32}"
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"
_MAX_KEY_FILE_BYTES = 64 * 1024
SITE_LINE_PREFIX = "relaylearn-site: "
_PEM_BEGIN_RE = re.compile(rb"^[ \t]*-----BEGIN ([A-Z0-9 ]+)-----[ \t]*\r?$", re.MULTILINE)
LEAKED_KEY = "treat that key as leaked (make a new pair with keygen)"


def validate_site_name(site: str) -> str:
    """Return ``site`` if it is a valid site name, else raise UserError."""
    if not isinstance(site, str) or not _SITE_NAME_RE.fullmatch(site):
        raise UserError(f"invalid site name {site!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
    return site


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """``"SHA256:"`` + the first 32 hex digits of sha256(raw 32-byte public key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:32]


@dataclass(frozen=True)
class SigningKey:
    """A site's private key, loaded and checked by :func:`load_private_key`."""

    site: str
    private_key: Ed25519PrivateKey = field(repr=False)
    public_key: Ed25519PublicKey = field(repr=False)
    fingerprint: str

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self.private_key.sign(data)


@dataclass(frozen=True)
class TrustedKey:
    """One public key of a trusted site (from ``<site>.pub`` in the trust folder)."""

    site: str
    public_key: Ed25519PublicKey = field(repr=False)
    fingerprint: str
    path: Path

    def verifies(self, signature: bytes, data: bytes) -> bool:
        try:
            self.public_key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class TrustStore:
    """The trusted public keys, by fingerprint."""

    keys: dict[str, TrustedKey]

    def get(self, fp: str) -> TrustedKey | None:
        return self.keys.get(fp)

    def __contains__(self, fp: object) -> bool:
        return fp in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self.keys.values())

    @classmethod
    def of(cls, *public_keys: tuple[str, Ed25519PublicKey]) -> TrustStore:
        """A store built in memory from ``(site, public_key)`` pairs (single-machine runs, tests)."""
        keys = {}
        for site, key in public_keys:
            fp = fingerprint(key)
            keys[fp] = TrustedKey(validate_site_name(site), key, fp, Path(f"<memory:{site}>"))
        return cls(keys)


# ----- writing ------------------------------------------------------------------------------


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` from the start; never overwrite, never
    leave half a file (:func:`~relaylearn.files.atomic_write` with ``exists_error``)."""
    atomic_write(path, data, mode=mode, exists_error="refusing to overwrite an existing key file")


def generate_keypair(out_dir: str | Path, site: str) -> tuple[Path, Path]:
    """Create ``<out_dir>/<site>.key`` (0600) and ``<site>.pub``; return (private, public) paths.

    Raises UserError for an invalid site name, an existing key file, or an unusable folder.
    """
    validate_site_name(site)
    out_dir = Path(out_dir)
    private_path = out_dir / f"{site}{PRIVATE_KEY_SUFFIX}"
    public_path = out_dir / f"{site}{PUBLIC_KEY_SUFFIX}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except (FileExistsError, NotADirectoryError):
        raise UserError("key folder path exists and is not a folder", out_dir) from None
    except OSError as exc:
        raise UserError(f"cannot create the key folder: {exc.strerror}", out_dir) from None
    for existing in (private_path, public_path):
        if existing.exists() or existing.is_symlink():
            raise UserError("refusing to overwrite an existing key file", existing)

    private_key = Ed25519PrivateKey.generate()
    site_line = f"{SITE_LINE_PREFIX}{site}\n".encode("ascii")
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()) + site_line
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) + site_line
    try:
        _write_new_file(private_path, private_pem, 0o600)
        try:
            _write_new_file(public_path, public_pem, 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"cannot write key file: {exc.strerror}", out_dir) from None
    return private_path, public_path


# ----- reading ------------------------------------------------------------------------------


def _read_key_file(path: Path) -> bytes:
    try:
        if not path.is_file():
            raise UserError("key file not found" if not path.exists() else "not a regular file", path)
        if path.stat().st_size > _MAX_KEY_FILE_BYTES:
            raise UserError("too large to be a key file", path)
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read key file: {exc.strerror}", path) from None


def _site_from_stem(path: Path) -> str:
    try:
        return validate_site_name(path.stem)
    except UserError:
        raise UserError("file name is not a valid site name (letters, digits, '-', '_' or '.')", path) from None


def _declared_site(data: bytes, path: Path) -> str | None:
    """The site name ``keygen`` wrote after the PEM block (None for a bare PEM file)."""
    lines = [line for line in data.decode("ascii", errors="replace").splitlines() if line.startswith(SITE_LINE_PREFIX)]
    if not lines:
        return None
    if len(lines) > 1:
        raise UserError("key file names more than one site", path)
    try:
        return validate_site_name(lines[0][len(SITE_LINE_PREFIX) :].strip())
    except UserError:
        raise UserError("key file declares an invalid site name", path) from None


def _bound_site(data: bytes, path: Path) -> str:
    """The site a key belongs to: the name written inside by keygen, which must match the file name."""
    stem = _site_from_stem(path)
    declared = _declared_site(data, path)
    if declared is not None and declared != stem:
        raise UserError(f"key was made for site '{declared}' but the file is named '{path.name}'; rename it back", path)
    return stem


def load_private_key(path: str | Path) -> SigningKey:
    """Load ``<site>.key``; UserError if missing, unreadable, readable by others, or not Ed25519."""
    path = Path(path)
    data = _read_key_file(path)
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise UserError(f"this is a public key; pass the private key ({path.with_suffix('.key').name}) to --key", path)
    if os.name == "posix":
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise UserError(f"private key is accessible by group/others (mode {mode:04o}); run: chmod 600 {path}", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError("encrypted private keys are not supported; use a key from 'relaylearn keygen'", path) from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError("not a PEM private key", path) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"not an Ed25519 key ({type(key).__name__.lstrip('_')}); use 'relaylearn keygen'", path)
    public_key = key.public_key()
    return SigningKey(_bound_site(data, path), key, public_key, fingerprint(public_key))


def load_public_key(path: str | Path, *, check_site: bool = True) -> TrustedKey:
    """Load one ``<site>.pub``; UserError naming the file if it is not an Ed25519 PEM public key, or
    (``check_site``) if the site name keygen wrote inside disagrees with the file name."""
    path = Path(path)
    data = _read_key_file(path)
    blocks = _pem_blocks(data)
    if _is_private_pem(data):
        raise UserError(f"this is a private key, not a public key: remove it from here, and {LEAKED_KEY}", path)
    if len(blocks) > 1:
        raise UserError(f"holds {len(blocks)} keys; one key per <site>{PUBLIC_KEY_SUFFIX}", path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise UserError("not a PEM public key", path) from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"not an Ed25519 public key ({type(key).__name__.lstrip('_')})", path)
    site = _bound_site(data, path) if check_site else _site_from_stem(path)
    return TrustedKey(site, key, fingerprint(key), path)


def load_trust_dir(path: str | Path) -> TrustStore:
    """Load every ``*.pub`` in the folder ``path`` (other files are ignored, except a private key).

    UserError if the folder is missing, holds no ``.pub`` file, a ``.pub`` cannot be parsed, two
    files hold the same key, or a private key lies there without its ``.pub``.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError("trust folder not found" if not path.exists() else "trust path is not a folder", path)
    try:
        entries = sorted(path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot list the trust folder: {exc.strerror}", path) from None
    candidates = [p for p in entries if p.suffix.lower() == PUBLIC_KEY_SUFFIX and not p.is_dir()]
    # a private key without its .pub beside it was copied here instead of the public key (a site's
    # own keys folder, holding both halves, may serve as a trust folder); one saved as .pub is
    # refused by load_public_key
    public_stems = {p.stem for p in candidates}
    private = [p for p in entries if p.is_file() and (p.suffix.lower() == PRIVATE_KEY_SUFFIX or _is_private_pem(_head(p)))]
    stray = [p for p in private if p.stem not in public_stems]
    if stray:
        raise UserError(f"a private key is in the trust folder instead of its public key: remove it, and {LEAKED_KEY}", stray[0])
    if not candidates:
        raise UserError(f"trust folder holds no public keys (*{PUBLIC_KEY_SUFFIX})", path)
    keys: dict[str, TrustedKey] = {}
    for candidate in candidates:
        trusted = load_public_key(candidate, check_site=False)
        if trusted.fingerprint in keys:
            raise UserError(f"same key as {keys[trusted.fingerprint].path.name} ({trusted.fingerprint}); keep one", candidate)
        keys[trusted.fingerprint] = load_public_key(candidate)
    return TrustStore(keys)


def _pem_blocks(data: bytes) -> list[bytes]:
    """The labels of the PEM blocks in ``data`` (``b"PUBLIC KEY"``, ...), from their BEGIN lines."""
    return _PEM_BEGIN_RE.findall(data)


def _is_private_pem(data: bytes) -> bool:
    """``data`` holds a PEM private key (a ``-----BEGIN ... PRIVATE KEY-----`` line, not merely the words)."""
    return any(label.endswith(b"PRIVATE KEY") for label in _pem_blocks(data))


def _head(path: Path, size: int = 4096) -> bytes:
    """The first ``size`` bytes of a file (empty if it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


RELAY_ID_FILE = "relay-id"


def read_relay_id(trust_dir: str | Path) -> str | None:
    """The relay this site belongs to, as stated by the file ``relay-id`` in the trust folder
    (one line; None when the folder has no such file). UserError if it is not a valid relay id."""
    path = Path(trust_dir) / RELAY_ID_FILE
    if not path.is_file():
        if path.exists() or path.is_symlink():
            raise UserError("is not a file; the relay id goes into a one-line file named relay-id", path)
        return None
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the relay id: {exc}", path) from None
    return validate_relay_id(text, path)


RELAY_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


def validate_relay_id(relay_id: str, where: str | Path | None = None) -> str:
    if not isinstance(relay_id, str) or not re.fullmatch(RELAY_ID_PATTERN, relay_id):
        raise UserError(f"invalid relay id {relay_id!r}: use 1-64 letters, digits, '-', '_' or '.'", where)
    return relay_id
