"""Directories and files replaced whole or not at all."""

from pathlib import Path

import pytest

from tandem.fsio import atomic_dir, atomic_write


def test_a_built_directory_replaces_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as scratch:
        (scratch / "new.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"], "scratch or old copies left behind"


def test_a_failed_build_leaves_the_old_directory(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final) as scratch:
        (scratch / "half.txt").write_text("half")
        raise RuntimeError("build failed")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_write_replaces_the_content(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    atomic_write(path, b"1")
    atomic_write(path, b"2", mode=0o600)
    assert path.read_bytes() == b"2" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]
