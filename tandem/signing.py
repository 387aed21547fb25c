"""Signed model artifacts: what the retrainer signs and what the edge verifies.

An artifact directory holds its files plus the manifest and its signature (`contract.MANIFEST_FILE`,
`contract.SIGNATURE_FILE`). The manifest lists every other file's sha256 and size under `files`;
the signature is the Ed25519 signature of the manifest's exact bytes. So one signature check plus one checksum per file
proves the whole directory came from the holder of the private key, byte for byte.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE


class VerificationError(Exception):
    """An artifact is unsigned, wrongly signed, incomplete, or altered."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file except the manifest and its signature."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    }


def generate_key(private_path: Path) -> Ed25519PublicKey:
    """Writes a new private key (0600) and its public key beside it (`<name>.pub`)."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path(private_path).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key.public_key()


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign_artifact(directory: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Adds `files` to the directory's manifest, rewrites it, and signs it."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"] = file_entries(directory)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (directory / MANIFEST_FILE).write_bytes(data)
    (directory / SIGNATURE_FILE).write_bytes(key.sign(data))
    return manifest


def verify_manifest(manifest_json: bytes, signature: bytes, key: Ed25519PublicKey) -> dict[str, Any]:
    """The parsed manifest, if `signature` is the key's signature of exactly these bytes."""
    try:
        key.verify(signature, manifest_json)
    except InvalidSignature as exc:
        raise VerificationError("manifest signature does not verify with the configured public key") from exc
    manifest = json.loads(manifest_json)
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise VerificationError("signed manifest lists no files")
    return manifest


def verify_artifact(directory: Path, key: Ed25519PublicKey) -> dict[str, Any]:
    """Checks the signature, then every listed file's size and sha256; returns the manifest."""
    if not (directory / SIGNATURE_FILE).is_file():
        raise VerificationError(f"{directory}: unsigned ({SIGNATURE_FILE} missing)")
    manifest = verify_manifest((directory / MANIFEST_FILE).read_bytes(), (directory / SIGNATURE_FILE).read_bytes(), key)
    for name, entry in manifest["files"].items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise VerificationError(f"{directory}: {name} is missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise VerificationError(f"{directory}: {name} does not match its signed sha256 (corrupt or truncated)")
    return manifest
