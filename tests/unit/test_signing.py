"""Keys, keyrings, signature envelopes, and what verification refuses."""

import hashlib
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tandem.contract import Manifest, Promotion
from tandem.signing import (
    Keyring,
    KeyringFile,
    VerificationError,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_path,
    revoke,
    sign,
    sign_artifact,
    sign_promotion,
    signing_key,
    trust,
    verify,
    verify_artifact,
    verify_manifest,
    verify_promotion,
)


@pytest.fixture()
def key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "a.pem"
    generate_key(path)
    return path


@pytest.fixture()
def keyring(tmp_path: Path, key: Path) -> Path:
    path = tmp_path / "keyring.json"
    trust(path, public_path(key))
    return path


def _artifact(directory: Path, key: Path, files: dict[str, bytes] | None = None) -> Path:
    directory.mkdir(parents=True)
    for name, data in (files or {"model.onnx": b"weights", "labels.json": b'["a"]'}).items():
        (directory / name).write_bytes(data)
    manifest = Manifest(kind="student", task="t", version="v1", created_at=datetime.now(UTC), payload="model.onnx",
                        sha256=hashlib.sha256(b"weights").hexdigest(), sequence=3)
    (directory / "manifest.json").write_bytes(manifest.to_json())
    sign_artifact(directory, load_private_key(key))
    return directory


def test_key_id_is_the_sha256_prefix_of_the_raw_public_key_and_the_private_key_is_0600(key: Path) -> None:
    public = load_public_key(public_path(key))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(public) == hashlib.sha256(raw).hexdigest()[:16]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_key(key)  # never replaced


def test_a_missing_signing_key_is_an_error_unless_in_dev_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "missing.pem"
    with pytest.raises(FileNotFoundError, match="tandem keys new"):
        signing_key(path)
    assert not path.exists()
    assert key_id(signing_key(path, dev_generate=True).public_key()) == key_id(load_public_key(public_path(path)))


def test_signed_artifacts_verify_and_return_the_bytes_they_hashed(tmp_path: Path, key: Path, keyring: Path) -> None:
    directory = _artifact(tmp_path / "art", key)
    manifest, files = verify_artifact(directory, Keyring.load(keyring))
    assert manifest.key_id == key_id(load_public_key(public_path(key))) and manifest.sequence == 3
    assert files == {"labels.json": b'["a"]', "model.onnx": b"weights"}
    envelope = json.loads((directory / "manifest.sig").read_text())
    assert envelope["key_id"] == manifest.key_id and set(envelope) == {"key_id", "signature"}


def test_verification_refuses_untrusted_revoked_altered_and_missing(tmp_path: Path, key: Path, keyring: Path) -> None:
    directory = _artifact(tmp_path / "art", key)
    other = tmp_path / "keys" / "b.pem"
    generate_key(other)
    with pytest.raises(VerificationError, match="not in the keyring"):
        verify_artifact(directory, Keyring())
    (directory / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(VerificationError, match="model.onnx does not match its signed sha256"):
        verify_artifact(directory, Keyring.load(keyring))
    (directory / "model.onnx").unlink()
    with pytest.raises(VerificationError, match="model.onnx is missing"):
        verify_artifact(directory, Keyring.load(keyring))
    (directory / "manifest.sig").write_bytes(b"raw signature bytes")
    with pytest.raises(VerificationError, match="unsigned"):
        verify_artifact(directory, Keyring.load(keyring))
    (directory / "manifest.sig").unlink()
    with pytest.raises(VerificationError, match="unsigned"):
        verify_artifact(directory, Keyring.load(keyring))
    revoke(keyring, key_id(load_public_key(public_path(key))))
    with pytest.raises(VerificationError, match="revoked"):
        verify(b"data", sign(b"data", load_private_key(key)), Keyring.load(keyring))


def test_a_manifest_must_name_the_key_that_signed_it(tmp_path: Path, key: Path, keyring: Path) -> None:
    directory = _artifact(tmp_path / "art", key)
    data = json.loads((directory / "manifest.json").read_text())
    data["key_id"] = "0" * 16
    forged = json.dumps(data).encode()
    with pytest.raises(VerificationError, match="names key 0000000000000000"):
        verify_manifest(forged, sign(forged, load_private_key(key)), Keyring.load(keyring))


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 129])
def test_signed_file_names_must_be_safe(tmp_path: Path, key: Path, keyring: Path, name: str) -> None:
    directory = _artifact(tmp_path / "art", key)
    data = json.loads((directory / "manifest.json").read_text())
    data["files"][name] = data["files"].pop("labels.json")
    signed = json.dumps(data).encode()
    with pytest.raises(VerificationError, match="signed manifest is invalid"):
        verify_manifest(signed, sign(signed, load_private_key(key)), Keyring.load(keyring))


def test_promotions_verify_and_tampering_is_refused(key: Path, keyring: Path) -> None:
    promotion = Promotion(task="t", version="v2", sequence=2, manifest_sha256="a" * 64, previous="v1",
                          promoted_at=datetime.now(UTC), key_id=key_id(load_public_key(public_path(key))))
    data, signature = sign_promotion(promotion, load_private_key(key))
    assert verify_promotion(data, signature, Keyring.load(keyring)) == promotion
    tampered = data.replace(b'"rollback_of": null', b'"rollback_of": "v3"')
    with pytest.raises(VerificationError, match="does not verify"):
        verify_promotion(tampered, signature, Keyring.load(keyring))
    with pytest.raises(VerificationError, match="no promotion"):
        verify_promotion(b"", b"", Keyring.load(keyring))


def test_keyrings_round_trip_and_refuse_a_key_filed_under_another_id(tmp_path: Path, key: Path, keyring: Path) -> None:
    other = tmp_path / "keys" / "b.pem"
    generate_key(other)
    second = trust(keyring, public_path(other))
    revoke(keyring, second)
    loaded = Keyring.load(keyring)
    assert set(loaded.keys) == {key_id(load_public_key(public_path(key))), second} and loaded.revoked == {second}
    trust(keyring, public_path(other))
    assert Keyring.load(keyring).revoked == {second}, "trusting again does not lift a revocation"
    raw = json.loads(keyring.read_text())
    first = next(k for k in raw["keys"] if k != second)
    raw["keys"][first], raw["keys"][second] = raw["keys"][second], raw["keys"][first]
    # Both entries are misfiled; the parser names whichever it reads first.
    misfiled = rf"keys\.({first} holds the key whose id is {second}|{second} holds the key whose id is {first})"
    with pytest.raises(ValueError, match=misfiled):
        Keyring.parse(json.dumps(raw).encode())
    with pytest.raises(ValueError, match="invalid key id"):
        revoke(keyring, "../x")


def test_a_keyring_file_is_read_again_when_it_changes(tmp_path: Path, key: Path, keyring: Path) -> None:
    current = KeyringFile(keyring)
    kid = key_id(load_public_key(public_path(key)))
    assert current.current().trusted(kid)
    revoke(keyring, kid)
    os.utime(keyring, ns=(1, 1))  # a different mtime even on a coarse clock
    with pytest.raises(VerificationError, match="revoked"):
        current.current().trusted(kid)
    keyring.write_text("{torn")
    with pytest.raises(VerificationError, match="keyring unusable"):
        current.current()
