import json
import os
import re
from pathlib import Path

import pytest

from cloud.registry import ModelNotFound, ModelRegistry
from cloud.training.artifact import write_manifest
from tandem.signing import generate_key, load_private_key, load_public_key, public_path, sign_artifact, verify_artifact


@pytest.fixture()
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "signing.pem"
    generate_key(path)
    return path


def _artifact(tmp_path: Path, key_path: Path, payload: bytes, task: str = "t", sign: bool = True) -> Path:
    directory = tmp_path / "build" / payload.hex()
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    (directory / "labels.json").write_text('["a", "b"]\n')
    write_manifest(directory, kind="student", task=task, payload="model.onnx")
    if sign:
        sign_artifact(directory, load_private_key(key_path))
    return directory


def test_publish_copies_a_verifiable_version_and_lists_it(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    assert registry.versions("t") == [first, second] and registry.versions("other") == []
    manifest = verify_artifact(registry.path("t", second), load_public_key(public_path(key_path)))
    assert manifest["version"] == second
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


def test_promote_records_the_previous_version_atomically(tmp_path: Path, key_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    assert registry.promoted("t") is None
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    registry.promote("t", first)
    registry.promote("t", second)
    registry.promote("t", second)  # promoting again keeps the version to roll back to
    record = json.loads((tmp_path / "registry" / "t" / "promoted.json").read_text())
    assert registry.promoted("t") == record["version"] == second and record["previous"] == first
    assert record["promoted_at"]
    assert [p.name for p in (tmp_path / "registry" / "t").iterdir() if p.is_file()] == ["promoted.json"]


def test_promote_failure_leaves_the_promoted_file_untouched(
    tmp_path: Path, key_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    first = registry.publish("t", _artifact(tmp_path, key_path, b"one"))
    second = registry.publish("t", _artifact(tmp_path, key_path, b"two"))
    registry.promote("t", first)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        registry.promote("t", second)
    assert registry.promoted("t") == first
    assert [p.name for p in (tmp_path / "registry" / "t").iterdir() if p.is_file()] == ["promoted.json"]


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
        registry.promote(task, version)
    assert registry.promoted("t") is None
