"""The signed model supply chain: what the retrainer and the registry sign, and what the edge verifies.

An artifact directory holds its files plus the manifest and its signature (`contract.MANIFEST_FILE`,
`contract.SIGNATURE_FILE`). The manifest lists every other file's sha256 and size under `files`,
its registry `sequence` and the signing `key_id`. A signature is a small JSON envelope,
`{"key_id": ..., "signature": <base64 Ed25519 signature of the exact signed bytes>}`, so a
verifier picks the key from its `Keyring` and keys can rotate. A promotion (`contract.Promotion`)
is signed the same way. One signature check plus one checksum per file proves the whole
directory came from the holder of a trusted key, byte for byte.
"""

import base64
import binascii
import hashlib
import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tandem.contract import KEY_ID, MANIFEST_FILE, SIGNATURE_FILE, KeyId, Manifest, Promotion
from tandem.fsio import atomic_write

log = logging.getLogger(__name__)


class VerificationError(Exception):
    """An artifact or promotion is unsigned, wrongly signed, signed by an untrusted or revoked key,
    incomplete, or altered."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entries(directory: Path) -> dict[str, dict[str, int | str]]:
    """sha256 and size of every regular file except the manifest and its signature."""
    return {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    }


# Keys.


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key: short enough for logs and
    configs, long enough that no two keys of a fleet collide."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(private_path: Path) -> Ed25519PublicKey:
    """Writes a new private key (0600) and its public key beside it (`<name>.pub`); never
    replaces an existing key (what it signed would no longer verify)."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created 0600 and exclusively: the key is never readable by others, not even for a moment.
    with os.fdopen(os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(pem)
    public_path(private_path).write_bytes(public_pem(key.public_key()))
    return key.public_key()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _public_key(path.read_bytes(), str(path))


def signing_key(path: Path, dev_generate: bool = False) -> Ed25519PrivateKey:
    """The private key at `path`. A missing key is an error: a generated one would sign
    versions no edge trusts. Only explicit development mode (`dev_generate`) creates one."""
    if not path.exists():
        if not dev_generate:
            raise FileNotFoundError(
                f"signing key {path} does not exist: create it with `tandem keys new --out {path}` and add "
                f"{public_path(path)} to the edges' keyring (`tandem keys trust`)"
            )
        public = generate_key(path)
        log.warning("development mode: generated signing key %s (key id %s); edges must trust %s",
                    path, key_id(public), public_path(path))
    return load_private_key(path)


def _public_key(pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"{where}: not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}: not an Ed25519 public key")
    return key


# Keyrings.


class _KeyringFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[KeyId, str] = Field(default_factory=dict, description="key id -> public key PEM")
    revoked: list[KeyId] = Field(default_factory=list)


class Keyring:
    """The public keys a verifier trusts, by key id, and the ids it refuses although it once trusted them.

    Stored as JSON: `{"keys": {key_id: PEM}, "revoked": [key_id]}`.
    """

    def __init__(self, keys: dict[str, Ed25519PublicKey] | None = None, revoked: frozenset[str] = frozenset()) -> None:
        self.keys = dict(keys or {})
        self.revoked = frozenset(revoked)

    @classmethod
    def parse(cls, data: bytes, where: str = "keyring") -> "Keyring":
        """Raises ValueError naming what is wrong, including a key filed under another key's id."""
        try:
            raw = _KeyringFile.model_validate_json(data)
        except ValidationError as exc:
            raise ValueError(f"{where}: not a keyring: {exc}") from exc
        keys = {}
        for kid, pem in raw.keys.items():
            key = _public_key(pem.encode(), f"{where}: keys.{kid}")
            if key_id(key) != kid:
                raise ValueError(f"{where}: keys.{kid} holds the key whose id is {key_id(key)}")
            keys[kid] = key
        return cls(keys, frozenset(raw.revoked))

    @classmethod
    def load(cls, path: Path) -> "Keyring":
        return cls.parse(path.read_bytes(), str(path))

    def to_json(self) -> bytes:
        raw = _KeyringFile(keys={k: public_pem(v).decode() for k, v in sorted(self.keys.items())},
                           revoked=sorted(self.revoked))
        return (raw.model_dump_json(indent=2) + "\n").encode()

    def trusted(self, kid: str) -> Ed25519PublicKey:
        """The key with this id; VerificationError if it is revoked or unknown."""
        if kid in self.revoked:
            raise VerificationError(f"key {kid} is revoked")
        if kid not in self.keys:
            raise VerificationError(f"key {kid} is not in the keyring (trusted: {sorted(self.keys) or 'none'})")
        return self.keys[kid]


def trust(keyring_path: Path, public_key_path: Path) -> str:
    """Adds a public key to a keyring file (created if missing); returns its key id. A revoked
    key stays revoked."""
    public = load_public_key(public_key_path)
    keyring = Keyring.load(keyring_path) if keyring_path.exists() else Keyring()
    kid = key_id(public)
    atomic_write(keyring_path, Keyring({**keyring.keys, kid: public}, keyring.revoked).to_json())
    return kid


def revoke(keyring_path: Path, kid: str) -> None:
    """Marks a key id revoked in a keyring file: whatever it signed is refused from then on."""
    if not KEY_ID.fullmatch(kid):
        raise ValueError(f"invalid key id {kid!r}: 16 lowercase hex digits")
    keyring = Keyring.load(keyring_path) if keyring_path.exists() else Keyring()
    atomic_write(keyring_path, Keyring(keyring.keys, keyring.revoked | {kid}).to_json())


class KeyringFile:
    """A keyring file, read again whenever it changes: a rotation or revocation reaches a
    running edge by replacing the file (a ConfigMap update), with no restart or re-imaging."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._keyring = Keyring()

    def current(self) -> Keyring:
        """The file's keyring; VerificationError if it cannot be read, so that nothing verifies
        against keys the operator may have meant to revoke."""
        try:
            stat = self.path.stat()
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                self._keyring = Keyring.load(self.path)
                self._seen = seen
                log.info("keyring %s: trusting %s, revoked %s", self.path, sorted(self._keyring.keys),
                         sorted(self._keyring.revoked))
        except (OSError, ValueError) as exc:
            self._seen = None
            raise VerificationError(f"keyring unusable: {exc}") from exc
        return self._keyring


# Signatures.


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: KeyId
    signature: str


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The signature envelope of `data`."""
    envelope = _Envelope(key_id=key_id(key.public_key()), signature=base64.b64encode(key.sign(data)).decode())
    return (envelope.model_dump_json() + "\n").encode()


def verify(data: bytes, envelope: bytes, keyring: Keyring) -> str:
    """The signing key's id, if `envelope` holds a trusted key's signature of exactly `data`."""
    try:
        parsed = _Envelope.model_validate_json(envelope)
        signature = base64.b64decode(parsed.signature, validate=True)
    except (ValidationError, binascii.Error) as exc:
        raise VerificationError("unsigned: the signature is not a signature envelope") from exc
    try:
        keyring.trusted(parsed.key_id).verify(signature, data)
    except InvalidSignature as exc:
        raise VerificationError(f"signature does not verify with key {parsed.key_id}") from exc
    return parsed.key_id


# Artifacts.


def sign_artifact(directory: Path, key: Ed25519PrivateKey) -> Manifest:
    """Adds `files` and `key_id` to the directory's manifest, rewrites it, and signs it."""
    fields = Manifest.read(directory).model_dump(mode="json")
    manifest = Manifest.model_validate({**fields, "files": file_entries(directory), "key_id": key_id(key.public_key())})
    data = manifest.to_json()
    (directory / MANIFEST_FILE).write_bytes(data)
    (directory / SIGNATURE_FILE).write_bytes(sign(data, key))
    return manifest


def verify_manifest(manifest_json: bytes, signature: bytes, keyring: Keyring) -> Manifest:
    """The manifest, if `signature` is a trusted key's signature of exactly these bytes and the
    manifest names that key and lists its files (each under a safe name)."""
    kid = verify(manifest_json, signature, keyring)
    try:
        manifest = Manifest.model_validate_json(manifest_json)
    except ValidationError as exc:
        raise VerificationError(f"signed manifest is invalid: {exc}") from exc
    if manifest.key_id != kid:
        raise VerificationError(f"signed manifest names key {manifest.key_id}, but key {kid} signed it")
    if not manifest.files:
        raise VerificationError("signed manifest lists no files")
    return manifest


def verify_artifact(directory: Path, keyring: Keyring) -> tuple[Manifest, dict[str, bytes]]:
    """The verified manifest and every listed file's bytes. Each file is read once and those
    bytes are hashed, so what the caller uses is exactly what was checked."""
    if not (directory / SIGNATURE_FILE).is_file():
        raise VerificationError(f"{directory}: unsigned ({SIGNATURE_FILE} missing)")
    try:
        manifest_json, signature = (directory / MANIFEST_FILE).read_bytes(), (directory / SIGNATURE_FILE).read_bytes()
    except OSError as exc:
        raise VerificationError(f"{directory}: unreadable manifest: {exc}") from exc
    try:
        manifest = verify_manifest(manifest_json, signature, keyring)
    except VerificationError as exc:
        raise VerificationError(f"{directory}: {exc}") from exc
    files = {}
    for name, entry in manifest.files.items():
        path = directory / name
        # The size first: a file swapped for a huge one is not read into memory.
        if not path.is_file() or path.stat().st_size != entry.size:
            raise VerificationError(f"{directory}: {name} is missing or not its signed size")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VerificationError(f"{directory}: {name} is unreadable: {exc}") from exc
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise VerificationError(f"{directory}: {name} does not match its signed sha256 (corrupt or truncated)")
        files[name] = data
    return manifest, files


# Promotions.


def sign_promotion(promotion: Promotion, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """promoted.json's bytes and their signature envelope."""
    if promotion.key_id != key_id(key.public_key()):
        raise ValueError(f"promotion names key {promotion.key_id}, not the signing key {key_id(key.public_key())}")
    data = promotion.to_json()
    return data, sign(data, key)


def verify_promotion(promotion_json: bytes, signature: bytes, keyring: Keyring) -> Promotion:
    """The promotion, if a trusted key signed exactly these bytes and the promotion names that key."""
    if not promotion_json:
        raise VerificationError("unsigned: no promotion")
    try:
        kid = verify(promotion_json, signature, keyring)
    except VerificationError as exc:
        raise VerificationError(f"promotion: {exc}") from exc
    try:
        promotion = Promotion.model_validate_json(promotion_json)
    except ValidationError as exc:
        raise VerificationError(f"signed promotion is invalid: {exc}") from exc
    if promotion.key_id != kid:
        raise VerificationError(f"signed promotion names key {promotion.key_id}, but key {kid} signed it")
    return promotion


def manifest_sha256(manifest_json: bytes) -> str:
    """What a promotion pins: the exact manifest bytes (which pin every file)."""
    return hashlib.sha256(manifest_json).hexdigest()
