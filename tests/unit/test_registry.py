import os
import re
from pathlib import Path

import pytest

from cloud.registry import ModelNotFound, ModelRegistry
from cloud.training.artifact import write_manifest
from tandem.signing import (
    Keyring,
    generate_key,
    key_id,
    load_private_key,
    manifest_sha256,
    public_path,
    sign_artifact,
    trust,
    verify_artifact,
    verify_promotion,
)


@pytest.fixture()
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "signing.pem"
    generate_key(path)
    return path


def _artifact(tmp_path: Path, key_path: Path, payload: bytes, task: str = "t", sign: bool = True,
              sequence: int | None = None) -> Path:
    """A signed artifact whose sequence is the registry's next one unless given."""
    directory = tmp_path / "build" / payload.hex()
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    (directory / "labels.json").write_text('["a", "b"]\n')
    if sequence is None:
        sequence = ModelRegistry(tmp_path / "registry").next_sequence(task)
    write_manifest(directory, kind="student", task=task, payload="model.onnx", sequence=sequence)
    if sign:
        sign_artifact(directory, load_private_key(key_path))
    return directory


def test_publish_copies_a_verifiable_version_and_lists_it(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    assert registry.versions("t") == [first, second] and registry.versions("other") == []
    keyring = tmp_path / "keyring.json"
    trust(keyring, public_path(key_path))
    manifest, _ = verify_artifact(registry.path("t", second), Keyring.load(keyring))
    assert manifest.version == second and manifest.sequence == 2 and registry.next_sequence("t") == 3
    assert not list((tmp_path / "registry" / "t").glob(".*")), "scratch directories left behind"


def test_publish_refuses_unsigned_foreign_and_republished_artifacts(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    with pytest.raises(ValueError, match="unsigned"):
        registry.publish("t", _artifact(tmp_path, key_path, b"raw", sign=False))
    with pytest.raises(ValueError, match="task 'u' is not 't'"):
        registry.publish("t", _artifact(tmp_path, key_path, b"foreign", task="u"))
    artifact = _artifact(tmp_path, key_path, b"once")
    registry.publish("t", artifact)
    with pytest.raises(FileExistsError, match="immutable"):
        registry.publish("t", artifact)
    for sequence in (0, 1):  # the published one has 1: a sequence must rise
        with pytest.raises(ValueError, match=f"sequence {sequence} is not above every published t version's: "
                                             "it must be at least 2"):
            registry.publish("t", _artifact(tmp_path, key_path, f"stale{sequence}".encode(), sequence=sequence))


def test_versions_are_ordered_by_sequence_not_by_creation_time(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    late = _artifact(tmp_path, key_path, b"built-first", sequence=2)
    early = _artifact(tmp_path, key_path, b"built-second", sequence=1)
    second, first = registry.publish("t", early), registry.publish("t", late)
    assert registry.versions("t") == [second, first]


def test_promote_signs_a_record_of_the_version_and_the_previous_one(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    key = load_private_key(key_path)
    assert registry.promoted("t") is None and registry.promotion("t") is None
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    registry.promote("t", first, key)
    registry.promote("t", second, key)
    registry.promote("t", second, key)  # promoting again keeps the version to roll back to
    data, signature = registry.promotion("t")
    keyring = Keyring({key_id(key.public_key()): key.public_key()})
    promotion = verify_promotion(data, signature, keyring)
    manifest_json = (registry.path("t", second) / "manifest.json").read_bytes()
    assert registry.promoted("t") == promotion.version == second and promotion.previous == first
    assert (promotion.task, promotion.sequence, promotion.rollback_of) == ("t", 2, None)
    assert promotion.manifest_sha256 == manifest_sha256(manifest_json) and promotion.key_id == key_id(key.public_key())
    assert promotion.promoted_at
    assert sorted(p.name for p in (tmp_path / "registry" / "t").iterdir() if p.is_file()) == [
        "promoted.json", "promoted.sig"]


def test_an_older_version_is_promoted_only_as_a_rollback_of_the_promoted_one(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    key = load_private_key(key_path)
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    with pytest.raises(ValueError, match="no.*promoted|is not the promoted"):
        registry.promote("t", first, key, rollback_of=second)  # nothing promoted yet
    registry.promote("t", second, key)
    with pytest.raises(ValueError, match="only a rollback may promote it"):
        registry.promote("t", first, key)
    with pytest.raises(ValueError, match="rollback_of 'other' is not the promoted t version"):
        registry.promote("t", first, key, rollback_of="other")
    with pytest.raises(ValueError, match="is not older"):
        registry.promote("t", second, key, rollback_of=second)
    promotion = registry.promote("t", first, key, rollback_of=second)
    assert (promotion.version, promotion.sequence) == (first, 1)
    assert promotion.rollback_of == promotion.previous == second
    assert registry.promoted("t") == first


def test_promote_failure_leaves_the_promoted_file_untouched(
    tmp_path: Path, key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    key = load_private_key(key_path)
    registry.promote("t", first, key)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        registry.promote("t", second, key)
    assert registry.promoted("t") == first
    assert sorted(p.name for p in (tmp_path / "registry" / "t").iterdir() if p.is_file()) == [
        "promoted.json", "promoted.sig"]


@pytest.mark.parametrize(
    "task, version, message",
    [
        ("t", "absent", "task 't' has no published version 'absent'"),
        ("absent", "v", "task 'absent' has no published version 'v'"),
        ("t", "../t", "invalid version name '../t'"),
        ("..", "t", "invalid task name '..'"),
        ("t", "", "invalid version name ''"),
    ],
)
def test_missing_or_invalid_versions_are_not_found(
    tmp_path: Path, key_path: Path, task: str, version: str, message: str
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    with pytest.raises(ModelNotFound, match=re.escape(message)):
        registry.path(task, version)
    with pytest.raises(ModelNotFound):
        registry.promote(task, version, load_private_key(key_path))
    assert registry.promoted("t") is None
