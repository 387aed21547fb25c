"""What an edge takes as its next version: a signed promotion of a signed manifest, newer than
the serving one or a signed rollback of it."""

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge.model_store import ModelStore
from tandem.contract import Manifest, Promotion
from tandem.signing import (
    Keyring,
    VerificationError,
    generate_key,
    key_id,
    load_private_key,
    manifest_sha256,
    sign,
    sign_promotion,
)
from tandem.v1 import fleet_pb2


@pytest.fixture()
def key(tmp_path: Path):
    generate_key(tmp_path / "k.pem")
    return load_private_key(tmp_path / "k.pem")


@pytest.fixture()
def store(tmp_path: Path, key) -> ModelStore:
    keyring = Keyring({key_id(key.public_key()): key.public_key()})
    return ModelStore(tmp_path / "models", lambda: keyring, lambda: None)


def _manifest(version: str, sequence: int, key) -> Manifest:
    return Manifest(kind="student", task="t", version=version, created_at=datetime.now(UTC), payload="model.onnx",
                    sha256=hashlib.sha256(b"m").hexdigest(), sequence=sequence, key_id=key_id(key.public_key()),
                    files={"model.onnx": {"sha256": hashlib.sha256(b"m").hexdigest(), "size": 1}})


def _offer(manifest: Manifest, key, rollback_of: str | None = None, **promoted: object) -> fleet_pb2.ModelManifest:
    data = manifest.to_json()
    fields = {"task": "t", "version": manifest.version, "sequence": manifest.sequence,
              "manifest_sha256": manifest_sha256(data), "rollback_of": rollback_of,
              "promoted_at": datetime.now(UTC), "key_id": key_id(key.public_key()), **promoted}
    promotion_json, promotion_signature = sign_promotion(Promotion(**fields), key)
    return fleet_pb2.ModelManifest(task="t", version=manifest.version, manifest_json=data, signature=sign(data, key),
                                   promotion_json=promotion_json, promotion_signature=promotion_signature)


def test_a_newer_version_is_taken(store: ModelStore, key) -> None:
    offered = _manifest("v3", 3, key)
    assert store.check_offer("t", _offer(offered, key), _manifest("v2", 2, key)) == offered


def test_any_published_version_supersedes_an_artifact_built_outside_the_registry(store: ModelStore, key) -> None:
    assert store.check_offer("t", _offer(_manifest("v1", 1, key), key), _manifest("seed", 0, key)).version == "v1"


@pytest.mark.parametrize(
    ("offered", "rollback_of", "message"),
    [
        (("v1", 1), None, "downgrade refused: sequence 1 is older than the serving v2's 2"),
        (("v1", 1), "v9", "not a signed rollback of it"),
        (("v2b", 2), None, "sequence 2 is the serving version v2's"),
    ],
)
def test_older_and_equal_sequences_are_refused_unless_a_rollback_of_the_serving_version(
    store: ModelStore, key, offered: tuple[str, int], rollback_of: str | None, message: str
) -> None:
    with pytest.raises(VerificationError, match=message):
        store.check_offer("t", _offer(_manifest(*offered, key), key, rollback_of), _manifest("v2", 2, key))


def test_a_signed_rollback_of_the_serving_version_is_taken(store: ModelStore, key) -> None:
    offer = _offer(_manifest("v1", 1, key), key, rollback_of="v2")
    assert store.check_offer("t", offer, _manifest("v2", 2, key)).version == "v1"


def test_the_promotion_must_be_signed_and_pin_the_offered_manifest(store: ModelStore, key, tmp_path: Path) -> None:
    serving = _manifest("v1", 1, key)
    offer = _offer(_manifest("v2", 2, key), key)
    unsigned = fleet_pb2.ModelManifest()
    unsigned.CopyFrom(offer)
    unsigned.ClearField("promotion_json")
    with pytest.raises(VerificationError, match="no promotion"):
        store.check_offer("t", unsigned, serving)
    for field, value, message in [("manifest_sha256", "0" * 64, "not the one the signed promotion pins"),
                                  ("version", "v9", "not the offered 't' version 'v2'"),
                                  ("sequence", 7, "manifest sequence 2 is not the promotion's 7")]:
        with pytest.raises(VerificationError, match=message):
            store.check_offer("t", _offer(_manifest("v2", 2, key), key, **{field: value}), serving)
    generate_key(tmp_path / "other.pem")
    foreign = _offer(_manifest("v2", 2, key), load_private_key(tmp_path / "other.pem"))
    with pytest.raises(VerificationError, match="not in the keyring"):
        store.check_offer("t", foreign, serving)
