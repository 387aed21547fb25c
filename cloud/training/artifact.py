"""The manifest that pins a model directory's content (`contract.Manifest`)."""

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tandem.contract import MANIFEST_FILE, Manifest
from tandem.signing import sha256_file


def write_manifest(
    directory: Path, kind: str, task: str, payload: str, sequence: int = 0, **fields: Any
) -> dict[str, Any]:
    """Writes manifest.json: version, sha256 of `payload`, creation time, `sequence` (the
    registry's `next_sequence` for a version to publish; 0 for one built outside the registry)
    and `fields`; returns it as JSON values."""
    created = datetime.now(timezone.utc)
    sha = sha256_file(directory / payload)
    manifest = Manifest(
        kind=kind,
        task=task,
        version=f"{task}-{kind}-{created:%Y%m%dT%H%M%S}-{sha[:8]}",
        created_at=created,
        payload=payload,
        sha256=sha,
        sequence=sequence,
        **fields,
    )
    (directory / MANIFEST_FILE).write_bytes(manifest.to_json())
    return manifest.model_dump(mode="json")
