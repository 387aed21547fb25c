"""Student versions on disk: `root/<task>/<version>/` (signed artifacts), and
`root/<task>/promoted.json` with `promoted.sig` (the signed promotion: the version edges should run)."""

import shutil
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.contract import MANIFEST_FILE, NAME, SIGNATURE_FILE, Manifest, Promotion
from tandem.fsio import atomic_dir, atomic_write
from tandem.signing import key_id, manifest_sha256, sign_promotion

PROMOTED = "promoted.json"
PROMOTED_SIGNATURE = "promoted.sig"


class ModelNotFound(KeyError):
    """No such task or version in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelRegistry:
    """Published versions are immutable and their sequences rise; promotion is a signed record,
    each of its two files replaced atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def publish(self, task: str, artifact_dir: Path) -> str:
        """Copies a signed artifact in atomically; returns its manifest's version. Its sequence
        must be above every published one's (`next_sequence`): versions are ordered, so an edge
        can tell an older one from a newer."""
        manifest = Manifest.read(artifact_dir)
        if not (artifact_dir / SIGNATURE_FILE).is_file() or not manifest.files or manifest.key_id is None:
            raise ValueError(f"{artifact_dir}: unsigned artifact ({SIGNATURE_FILE}, manifest files or key_id missing)")
        if manifest.task != task:
            raise ValueError(f"{artifact_dir}: manifest task {manifest.task!r} is not {task!r}")
        version = manifest.version
        final = self._task_dir(task) / _checked(version, "version")
        if final.exists():
            raise FileExistsError(f"{task} version {version} is already published; versions are immutable")
        if manifest.sequence < (least := self.next_sequence(task)):
            raise ValueError(f"{artifact_dir}: sequence {manifest.sequence} is not above every published {task} "
                             f"version's: it must be at least {least}")
        with atomic_dir(final) as scratch:
            for name in [*manifest.files, MANIFEST_FILE, SIGNATURE_FILE]:
                shutil.copyfile(artifact_dir / name, scratch / name)
        return version

    def next_sequence(self, task: str) -> int:
        """The least sequence the next published version of `task` may have."""
        return 1 + max((m.sequence for m in self._manifests(task).values()), default=0)

    def promote(self, task: str, version: str, key: Ed25519PrivateKey, rollback_of: str | None = None) -> Promotion:
        """Makes `version` the one edges fetch, signed with `key`; the current one is kept as
        `previous`. A version older than the promoted one needs `rollback_of` naming the promoted
        version: edges take an older version only as a signed rollback of the one they serve."""
        manifest_json = (self.path(task, version) / MANIFEST_FILE).read_bytes()  # ModelNotFound unless published
        manifest = Manifest.model_validate_json(manifest_json)
        current = self.promotion_record(task)
        if rollback_of is not None:
            if current is None or rollback_of != current.version:
                raise ValueError(f"rollback_of {rollback_of!r} is not the promoted {task} version "
                                 f"({current.version if current else 'none'!r})")
            if manifest.sequence >= current.sequence:
                raise ValueError(f"{version} (sequence {manifest.sequence}) is not older than {current.version} "
                                 f"(sequence {current.sequence}): promote it without a rollback")
        elif current is not None and manifest.sequence < current.sequence:
            raise ValueError(f"{version} (sequence {manifest.sequence}) is older than the promoted {current.version} "
                             f"(sequence {current.sequence}): only a rollback may promote it")
        previous = None if current is None else current.version if current.version != version else current.previous
        promotion = Promotion(
            task=task,
            version=version,
            sequence=manifest.sequence,
            manifest_sha256=manifest_sha256(manifest_json),
            previous=previous,
            rollback_of=rollback_of,
            promoted_at=datetime.now(timezone.utc),
            key_id=key_id(key.public_key()),
        )
        data, signature = sign_promotion(promotion, key)
        # Each file is replaced atomically; a reader between the two replaces sees a record and a
        # signature that do not match, which an edge refuses until its next poll.
        atomic_write(self._task_dir(task) / PROMOTED, data)
        atomic_write(self._task_dir(task) / PROMOTED_SIGNATURE, signature)
        return promotion

    def promoted(self, task: str) -> str | None:
        """The promoted version of `task`, or None before the first promotion."""
        record = self.promotion_record(task)
        return record.version if record else None

    def promotion_record(self, task: str) -> Promotion | None:
        """The parsed promotion (unverified: the registry's own file), or None."""
        path = self._task_dir(task) / PROMOTED
        return Promotion.model_validate_json(path.read_bytes()) if path.is_file() else None

    def promotion(self, task: str) -> tuple[bytes, bytes] | None:
        """The signed promotion's exact bytes and its signature envelope, for edges to verify."""
        directory = self._task_dir(task)
        if not (directory / PROMOTED).is_file():
            return None
        return (directory / PROMOTED).read_bytes(), (directory / PROMOTED_SIGNATURE).read_bytes()

    def path(self, task: str, version: str) -> Path:
        """The directory of a published version; ModelNotFound if there is none."""
        directory = self._task_dir(task) / _checked(version, "version")
        if not (directory / MANIFEST_FILE).is_file():
            raise ModelNotFound(f"task {task!r} has no published version {version!r}")
        return directory

    def versions(self, task: str) -> list[str]:
        """Published versions of `task`, oldest first (by sequence)."""
        manifests = self._manifests(task)
        return sorted(manifests, key=lambda v: (manifests[v].sequence, manifests[v].created_at, v))

    def _manifests(self, task: str) -> dict[str, Manifest]:
        directory = self._task_dir(task)
        if not directory.is_dir():
            return {}
        return {p.name: Manifest.read(p) for p in directory.iterdir()
                if NAME.fullmatch(p.name) and (p / MANIFEST_FILE).is_file()}

    def _task_dir(self, task: str) -> Path:
        return self.root / _checked(task, "task")


def _checked(name: str, what: str) -> str:
    # Names become path components, and FetchModel takes them off the wire.
    if not NAME.fullmatch(name):
        raise ModelNotFound(f"invalid {what} name {name!r}: letters, digits, '.', '_', '-', not starting with '.'")
    return name
