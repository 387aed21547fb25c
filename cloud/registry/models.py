"""Student versions on disk: `root/<task>/<version>/` (signed artifacts) and
`root/<task>/promoted.json` (the version edges should run, and the one before it)."""

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tandem.contract import MANIFEST_FILE, NAME, SIGNATURE_FILE, Manifest
from tandem.fsio import atomic_dir, atomic_write

PROMOTED = "promoted.json"


class ModelNotFound(KeyError):
    """No such task or version in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelRegistry:
    """Published versions are immutable; promotion is one atomic file replace."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def publish(self, task: str, artifact_dir: Path) -> str:
        """Copies a signed artifact in atomically; returns its manifest's version."""
        manifest = Manifest.read(artifact_dir)
        if not (artifact_dir / SIGNATURE_FILE).is_file() or not manifest.files:
            raise ValueError(f"{artifact_dir}: unsigned artifact ({SIGNATURE_FILE} or manifest files missing)")
        if manifest.task != task:
            raise ValueError(f"{artifact_dir}: manifest task {manifest.task!r} is not {task!r}")
        version = manifest.version
        final = self._task_dir(task) / _checked(version, "version")
        if final.exists():
            raise FileExistsError(f"{task} version {version} is already published; versions are immutable")
        with atomic_dir(final) as scratch:
            for name in [*manifest.files, MANIFEST_FILE, SIGNATURE_FILE]:
                shutil.copyfile(artifact_dir / name, scratch / name)
        return version

    def promote(self, task: str, version: str) -> None:
        """Makes `version` the one edges fetch; the current one is kept as `previous`."""
        self.path(task, version)  # ModelNotFound unless published
        current = self.promoted(task)
        record = {
            "version": version,
            "previous": current if current != version else self._promotion(task).get("previous"),
            "promoted_at": datetime.now(timezone.utc).isoformat(),
        }
        # A reader sees the old file or the new one, never a partial write.
        atomic_write(self._task_dir(task) / PROMOTED, (json.dumps(record, indent=2) + "\n").encode())

    def promoted(self, task: str) -> str | None:
        """The promoted version of `task`, or None before the first promotion."""
        return self._promotion(task).get("version")

    def path(self, task: str, version: str) -> Path:
        """The directory of a published version; ModelNotFound if there is none."""
        directory = self._task_dir(task) / _checked(version, "version")
        if not (directory / MANIFEST_FILE).is_file():
            raise ModelNotFound(f"task {task!r} has no published version {version!r}")
        return directory

    def versions(self, task: str) -> list[str]:
        """Published versions of `task`, oldest first (by manifest created_at)."""
        directory = self._task_dir(task)
        if not directory.is_dir():
            return []
        manifests = [p / MANIFEST_FILE for p in directory.iterdir() if NAME.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()]
        created = {m.parent.name: json.loads(m.read_text())["created_at"] for m in manifests}
        return sorted(created, key=lambda v: (created[v], v))

    def _task_dir(self, task: str) -> Path:
        return self.root / _checked(task, "task")

    def _promotion(self, task: str) -> dict[str, Any]:
        path = self._task_dir(task) / PROMOTED
        return json.loads(path.read_text()) if path.is_file() else {}


def _checked(name: str, what: str) -> str:
    # Names become path components, and FetchModel takes them off the wire.
    if not NAME.fullmatch(name):
        raise ModelNotFound(f"invalid {what} name {name!r}: letters, digits, '.', '_', '-', not starting with '.'")
    return name
