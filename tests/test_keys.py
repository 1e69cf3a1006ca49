"""Site keys: generation, permissions, loading, fingerprints and the trust folder."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relaylearn.errors import UserError
from relaylearn.keys import fingerprint, generate_keypair, load_private_key, load_trust_dir, validate_site_name

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


def test_generate_writes_private_0600_and_public_pem(tmp_path):
    private_path, public_path = generate_keypair(tmp_path / "keys", "Site-1_a.b")
    assert private_path == tmp_path / "keys" / "Site-1_a.b.key"
    assert public_path == tmp_path / "keys" / "Site-1_a.b.pub"
    if os.name == "posix":
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == ["Site-1_a.b.key", "Site-1_a.b.pub"]  # no temporary files left


@posix_only
def test_private_key_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        private_path, _ = generate_keypair(tmp_path, "site")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_generate_refuses_to_overwrite(tmp_path):
    private_path, public_path = generate_keypair(tmp_path, "site")
    before = private_path.read_bytes()
    with pytest.raises(UserError, match="overwrite"):
        generate_keypair(tmp_path, "site")
    assert private_path.read_bytes() == before
    private_path.unlink()  # only the .pub left: still refused, and no .key created
    with pytest.raises(UserError, match="overwrite"):
        generate_keypair(tmp_path, "site")
    assert not private_path.exists()


@pytest.mark.parametrize("bad", ["", "-site", ".hidden", "a/b", "../x", "a b", "é", "x" * 65, "a\n"])
def test_invalid_site_names_are_refused(tmp_path, bad):
    with pytest.raises(UserError, match="site name"):
        generate_keypair(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_valid_site_names():
    for good in ["A", "site1", "Domain-4_x.y", "x" * 64]:
        assert validate_site_name(good) == good


def test_load_private_key_round_trip_and_fingerprint(tmp_path):
    private_path, public_path = generate_keypair(tmp_path, "hospital-3")
    key = load_private_key(private_path)
    assert key.site == "hospital-3"
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key.fingerprint == "SHA256:" + hashlib.sha256(raw).hexdigest()[:32] == fingerprint(key.public_key)
    key.public_key.verify(key.sign(b"manifest"), b"manifest")  # raises if the pair does not match
    trust = load_trust_dir(tmp_path)
    assert trust.get(key.fingerprint).site == "hospital-3"
    assert "hospital-3.key" not in repr(key) and "PRIVATE" not in repr(key)


@posix_only
def test_group_readable_private_key_is_refused_with_chmod_hint(tmp_path):
    private_path, _ = generate_keypair(tmp_path, "site")
    private_path.chmod(0o640)
    with pytest.raises(UserError, match="chmod 600"):
        load_private_key(private_path)
    private_path.chmod(0o600)
    assert load_private_key(private_path).site == "site"


def test_missing_garbage_and_non_ed25519_private_keys(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_private_key(tmp_path / "nope.key")
    garbage = tmp_path / "garbage.key"
    fd = os.open(garbage, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(UserError, match="not a PEM private key"):
        load_private_key(garbage)
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    ec_path = tmp_path / "ec.key"
    fd = os.open(ec_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, ec_key)
    os.close(fd)
    with pytest.raises(UserError, match="not an Ed25519 key"):
        load_private_key(ec_path)


def test_trust_dir_loads_pub_files_and_ignores_others(tmp_path):
    keys = tmp_path / "keys"
    generate_keypair(keys, "a")
    generate_keypair(keys, "b")
    (keys / "README.txt").write_text("not a key")
    trust = load_trust_dir(keys)  # the .key files are ignored as well
    assert sorted(k.site for k in trust) == ["a", "b"]
    assert len(trust) == 2
    for key in trust:
        assert trust.get(key.fingerprint) is key and key.fingerprint in trust


def test_trust_dir_errors(tmp_path):
    with pytest.raises(UserError, match="trust folder not found"):
        load_trust_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no public keys"):
        load_trust_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    generate_keypair(bad, "good")
    (bad / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(UserError, match="broken.pub"):
        load_trust_dir(bad)


def test_trust_dir_refuses_other_key_types_and_duplicates(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (other / "ec.pub").write_bytes(ec_pub)
    with pytest.raises(UserError, match="ec.pub.*not an Ed25519"):
        load_trust_dir(other)
    dup = tmp_path / "dup"
    _, public_path = generate_keypair(dup, "one")
    (dup / "two.pub").write_bytes(public_path.read_bytes())
    with pytest.raises(UserError, match="same key"):
        load_trust_dir(dup)


def test_a_private_key_copied_instead_of_the_public_one_is_named_as_leaked(tmp_path):
    generate_keypair(tmp_path / "keys", "a")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "a.key").write_bytes((tmp_path / "keys" / "a.key").read_bytes())
    with pytest.raises(UserError, match="private key is in the trust folder instead of its public key.*leaked") as err:
        load_trust_dir(trust)
    assert "a.key" in str(err.value)


def test_a_public_key_given_as_the_private_key_says_which_file_to_pass(tmp_path):
    generate_keypair(tmp_path / "keys", "a")
    with pytest.raises(UserError, match=r"this is a public key; pass the private key \(a\.key\)"):
        load_private_key(tmp_path / "keys" / "a.pub")


def _trust_with(tmp_path, **files: bytes):
    """A trust folder with site a's public key and ``files`` (name → bytes)."""
    generate_keypair(tmp_path / "keys", "a")
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "a.pub").write_bytes((tmp_path / "keys" / "a.pub").read_bytes())
    for name, data in files.items():
        (trust / name.replace("_", ".")).write_bytes(data)
    return trust


def test_a_pub_file_with_several_keys_is_refused_naming_it(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def bare_pem() -> bytes:  # no relaylearn-site line: the second key was read by nobody
        return Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    trust = _trust_with(tmp_path)
    (trust / "b.pub").write_bytes(bare_pem() + bare_pem())
    with pytest.raises(UserError, match=r"holds 2 keys; one key per <site>\.pub") as refused:
        load_trust_dir(trust)
    assert refused.value.path == str(trust / "b.pub")


def test_only_a_pem_private_key_counts_as_leaked_and_one_saved_as_pub_does(tmp_path):
    trust = _trust_with(tmp_path, README_txt=b"Never put a PRIVATE KEY here, only <site>.pub files.\n")
    assert [k.site for k in load_trust_dir(trust)] == ["a"]
    (trust / "b.pub").write_bytes((tmp_path / "keys" / "a.key").read_bytes().replace(b"site: a", b"site: b"))
    with pytest.raises(UserError, match="this is a private key, not a public key.*leaked") as refused:
        load_trust_dir(trust)
    assert refused.value.path == str(trust / "b.pub")


def test_an_upper_case_pub_suffix_is_read(tmp_path):
    _, other = generate_keypair(tmp_path / "other", "HospB")
    trust = _trust_with(tmp_path)
    (trust / "HospB.PUB").write_bytes(other.read_bytes())
    assert sorted(k.site for k in load_trust_dir(trust)) == ["HospB", "a"]


def test_a_relay_id_that_is_a_folder_is_named(tmp_path):
    from relaylearn.keys import read_relay_id

    (tmp_path / "relay-id").mkdir()
    with pytest.raises(UserError, match="is not a file; the relay id goes into a one-line file") as refused:
        read_relay_id(tmp_path)
    assert refused.value.path == str(tmp_path / "relay-id")
    assert read_relay_id(tmp_path / "elsewhere") is None
