"""Writing model directories atomically, with a manifest that pins their content."""

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tandem.signing import sha256_file


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yields a scratch directory that replaces `final` only if the block succeeds.

    A failure mid-build leaves the previous `final` in place; so does a failure to swap.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    scratch.chmod(0o755)  # mkdtemp makes it 0700; the published directory must be readable
    try:
        yield scratch
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        try:
            scratch.rename(final)
        except OSError:
            if old.exists():
                old.rename(final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_manifest(directory: Path, kind: str, task: str, payload: str, **fields: Any) -> dict[str, Any]:
    """Writes manifest.json: version, sha256 of `payload`, creation time and `fields`."""
    created = datetime.now(timezone.utc)
    sha = sha256_file(directory / payload)
    manifest = {
        "kind": kind,
        "task": task,
        "version": f"{task}-{kind}-{created:%Y%m%dT%H%M%S}-{sha[:8]}",
        "created_at": created.isoformat(),
        "payload": payload,
        "sha256": sha,
        **fields,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
