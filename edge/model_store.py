"""Pulled student versions on disk, and the checks that let one in:

    <models_dir>/<task>/<version>/           verified artifacts: the serving one and the one before
    <models_dir>/<task>/.<version>.partial/  a download in progress
    <models_dir>/<task>/state.json           {"current", "previous", "failed": {version: why}}

Nothing reaches `<version>/` without its signature and every file's sha256 checked, and the
directory is checked again before it is served after a restart.
"""

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import TypeAdapter

from edge.faults import set_aside
from tandem.contract import MANIFEST_FILE, NAME, SIGNATURE_FILE
from tandem.fsio import atomic_write
from tandem.signing import VerificationError, verify_artifact, verify_manifest

log = logging.getLogger(__name__)

STATE = "state.json"


@dataclass
class TaskState:
    current: str | None = None
    previous: str | None = None
    failed: dict[str, str] = field(default_factory=dict)


_TASK_STATE = TypeAdapter(TaskState)


class ModelStore:
    def __init__(self, root: Path, key: Ed25519PublicKey, on_corrupt: Callable[[], None]) -> None:
        """`on_corrupt` is called for each corrupt state file, once it is set aside."""
        self.root = root
        self._key = key
        self._on_corrupt = on_corrupt

    def state(self, task: str) -> TaskState:
        """The task's state; an empty one if there is none, or if it is corrupt (then set
        aside, logged and reported: the configured artifact serves, and updates go on)."""
        path = self.root / task / STATE
        if not path.is_file():
            return TaskState()
        try:
            return _TASK_STATE.validate_json(path.read_bytes())
        except ValueError as exc:  # not JSON, not UTF-8, or not a state: pydantic says which
            log.error("%s is corrupt, starting %s's state afresh: %s", path, task, exc)
            set_aside(path)
            self._on_corrupt()
            return TaskState()

    def pulled_dirs(self, task: str) -> list[Path]:
        """Pulled directories to try at start, best first: the current version, then the
        previous one, each only if it still verifies. With the updater on, the registry is the
        source of truth, so they come before the configured artifact. Clears downloads a crash
        interrupted."""
        for partial in self.root.glob(f"{task}/.*.partial"):
            shutil.rmtree(partial)
        state = self.state(task)
        usable = []
        for version in (state.current, state.previous):
            if version is None:
                continue
            try:
                self._verified(task, version, self.root / task / version)
            except (OSError, VerificationError) as exc:
                log.warning("pulled %s version %s is unusable, not serving it: %s", task, version, exc)
                continue
            usable.append(self.root / task / version)
        return usable

    def check_offer(self, task: str, version: str, manifest_json: bytes, signature: bytes) -> dict[str, Any]:
        """The signed manifest's `files` (name → sha256, size), before anything is downloaded."""
        if not NAME.fullmatch(version):  # it came off the wire and becomes a directory name
            raise VerificationError(f"invalid version name {version!r}")
        manifest = verify_manifest(manifest_json, signature, self._key)
        _check_identity(manifest, task, version)
        for name in manifest["files"]:
            if Path(name).name != name or name in (".", "..", MANIFEST_FILE, SIGNATURE_FILE):
                raise VerificationError(f"signed manifest lists an invalid file name {name!r}")
        return manifest["files"]

    def staging(self, task: str, version: str, manifest_json: bytes, signature: bytes) -> Path:
        """An empty download directory holding only the signed manifest and its signature."""
        directory = self.root / task / f".{version}.partial"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        (directory / MANIFEST_FILE).write_bytes(manifest_json)
        (directory / SIGNATURE_FILE).write_bytes(signature)
        return directory

    def install(self, task: str, version: str, staging: Path) -> Path:
        """Verifies a finished download and moves it to `<task>/<version>/`."""
        self._verified(task, version, staging)
        final = self.root / task / version
        shutil.rmtree(final, ignore_errors=True)  # left by a crash before its promotion
        staging.rename(final)
        return final

    def promote(self, task: str, version: str) -> None:
        """Records `version` as serving and the one it replaced as previous; deletes older ones."""
        state = self.state(task)
        if state.current != version:
            state.previous, state.current = state.current, version
        self._save(task, state)
        for directory in (self.root / task).iterdir():
            if directory.is_dir() and directory.name not in (state.current, state.previous):
                shutil.rmtree(directory)

    def reject(self, task: str, version: str, why: str) -> None:
        """Remembers a version that must not be fetched again, and deletes what it left."""
        state = self.state(task)
        state.failed[version] = why
        self._save(task, state)
        if NAME.fullmatch(version):  # else it was refused before anything was written
            shutil.rmtree(self.root / task / version, ignore_errors=True)
            shutil.rmtree(self.root / task / f".{version}.partial", ignore_errors=True)

    def _verified(self, task: str, version: str, directory: Path) -> dict[str, Any]:
        manifest = verify_artifact(directory, self._key)
        _check_identity(manifest, task, version)
        return manifest

    def _save(self, task: str, state: TaskState) -> None:
        """Atomic and durable: the old state or the new one survives a power cut, never a mix."""
        atomic_write(self.root / task / STATE, (json.dumps(asdict(state), indent=2) + "\n").encode())


def _check_identity(manifest: dict[str, Any], task: str, version: str) -> None:
    """A validly signed manifest of another task or version must not pass for this one."""
    if (manifest.get("task"), manifest.get("version")) != (task, version):
        raise VerificationError(
            f"signed manifest is {manifest.get('task')!r} version {manifest.get('version')!r}, "
            f"not {task!r} version {version!r}"
        )
