"""Pulled student versions on disk, and the checks that let one in:

    <models_dir>/<task>/<version>/           verified artifacts: the serving one and the one before
    <models_dir>/<task>/.<version>.partial/  a download in progress
    <models_dir>/<task>/state.json           {"current", "previous", "failed": {version: why}}

Nothing reaches `<version>/` without the registry's signed promotion, the manifest's signature
and every file's sha256 checked, and the directory is checked again, as it is loaded, before
it is served after a restart.
"""

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import TypeAdapter

from edge.faults import set_aside
from tandem.contract import MANIFEST_FILE, NAME, SIGNATURE_FILE, Manifest, Promotion
from tandem.fsio import atomic_write
from tandem.signing import (
    Keyring,
    VerificationError,
    manifest_sha256,
    verify_artifact,
    verify_manifest,
    verify_promotion,
)
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)

STATE = "state.json"


@dataclass
class TaskState:
    current: str | None = None
    previous: str | None = None
    failed: dict[str, str] = field(default_factory=dict)


_TASK_STATE = TypeAdapter(TaskState)


class ModelStore:
    def __init__(self, root: Path, keyring: Callable[[], Keyring], on_corrupt: Callable[[], None]) -> None:
        """`keyring` gives the keys trusted now (a `KeyringFile.current`, read again when it
        changes). `on_corrupt` is called for each corrupt state file, once it is set aside."""
        self.root = root
        self._keyring = keyring
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
        previous one (each verified as it is loaded, `verified`). With the updater on, the
        registry is the source of truth, so they come before the configured artifact. Clears
        downloads a crash interrupted."""
        for partial in self.root.glob(f"{task}/.*.partial"):
            shutil.rmtree(partial)
        state = self.state(task)
        return [self.root / task / v for v in (state.current, state.previous) if v is not None]

    def verified(self, task: str, directory: Path, version: str | None = None) -> tuple[Manifest, dict[str, bytes]]:
        """The artifact's manifest and files, read once and verified against the keyring: it must
        be a version of `task` (and `version`, where given)."""
        manifest, files = verify_artifact(directory, self._keyring())
        _check_identity(manifest, task, version or manifest.version)
        return manifest, files

    def check_offer(self, task: str, offer: fleet_pb2.ModelManifest, serving: Manifest) -> Manifest:
        """The offered version's signed manifest, before anything is downloaded, if the registry's
        signed promotion names it, and it may replace `serving`."""
        if not NAME.fullmatch(offer.version):  # it came off the wire and becomes a directory name
            raise VerificationError(f"invalid version name {offer.version!r}")
        keyring = self._keyring()
        promotion = verify_promotion(offer.promotion_json, offer.promotion_signature, keyring)
        if (promotion.task, promotion.version) != (task, offer.version):
            raise VerificationError(f"the signed promotion is of {promotion.task!r} version {promotion.version!r}, "
                                    f"not the offered {task!r} version {offer.version!r}")
        if promotion.manifest_sha256 != manifest_sha256(offer.manifest_json):
            raise VerificationError("the offered manifest is not the one the signed promotion pins (manifest_sha256)")
        manifest = verify_manifest(offer.manifest_json, offer.signature, keyring)
        _check_identity(manifest, task, offer.version)
        if manifest.sequence != promotion.sequence:
            raise VerificationError(
                f"manifest sequence {manifest.sequence} is not the promotion's {promotion.sequence}"
            )
        _check_successor(promotion, serving)
        return manifest

    def staging(self, task: str, version: str, manifest_json: bytes, signature: bytes) -> Path:
        """An empty download directory holding only the signed manifest and its signature."""
        directory = self.root / task / f".{version}.partial"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        (directory / MANIFEST_FILE).write_bytes(manifest_json)
        (directory / SIGNATURE_FILE).write_bytes(signature)
        return directory

    def install(self, task: str, version: str, staging: Path) -> tuple[Manifest, dict[str, bytes]]:
        """Verifies a finished download, moves it to `<task>/<version>/`, and returns the verified
        manifest and files."""
        verified = self.verified(task, staging, version)
        final = self.root / task / version
        shutil.rmtree(final, ignore_errors=True)  # left by a crash before its promotion
        staging.rename(final)
        return verified

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

    def _save(self, task: str, state: TaskState) -> None:
        """Atomic and durable: the old state or the new one survives a power cut, never a mix."""
        atomic_write(self.root / task / STATE, (json.dumps(asdict(state), indent=2) + "\n").encode())


def _check_identity(manifest: Manifest, task: str, version: str) -> None:
    """A validly signed manifest of another task or version must not pass for this one."""
    if (manifest.task, manifest.version) != (task, version):
        raise VerificationError(
            f"signed manifest is {manifest.task!r} version {manifest.version!r}, not {task!r} version {version!r}"
        )


def _check_successor(promotion: Promotion, serving: Manifest) -> None:
    """Versions only move forward, except by a signed rollback of the serving version: a replayed
    old promotion (a downgrade to a version with known flaws) is refused."""
    if promotion.sequence > serving.sequence:
        return
    if promotion.sequence == serving.sequence:
        raise VerificationError(f"sequence {promotion.sequence} is the serving version {serving.version}'s")
    if promotion.rollback_of != serving.version:
        raise VerificationError(
            f"downgrade refused: sequence {promotion.sequence} is older than the serving {serving.version}'s "
            f"{serving.sequence}, and the promotion is not a signed rollback of it "
            f"(rollback_of: {promotion.rollback_of})"
        )
