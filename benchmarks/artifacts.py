"""Student versions as the retrainer would publish them, for the benchmarks that roll
versions out to edges."""

import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tandem.contract import MANIFEST_FILE, Manifest
from tandem.signing import sign_artifact


def signed_copy(student: Path, directory: Path, task: str, sequence: int, key: Ed25519PrivateKey) -> Path:
    """The student's files in `directory` as a new version of `task` with `sequence`, signed
    with `key`."""
    shutil.copytree(student, directory)
    fields = Manifest.read(directory).model_dump(mode="json")
    fields.update(version=f"{task}-bench-{sequence:04d}", sequence=sequence, files={}, key_id=None)
    (directory / MANIFEST_FILE).write_bytes(Manifest.model_validate(fields).to_json())
    sign_artifact(directory, key)
    return directory
