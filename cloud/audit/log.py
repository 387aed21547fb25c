"""The audit trail: an append-only, hash-chained log on the feedback store's filesystem.

    <uri>/000000000000.json, <uri>/000000000001.json, ...   one object per entry, named by its seq

Each entry is {seq, time, event, actor, data, prev, hash}: `prev` is the previous entry's hash
(GENESIS for the first) and `hash` the sha256 of the entry's canonical JSON without `hash`.
So changing, removing or reordering any entry breaks the chain at that entry, which `verify`
finds. (Cutting entries off the end leaves a shorter chain that still verifies: compare the
head that `verify` returns with one recorded earlier.)

Writers: the retrainer, the fleet, the CA and operators' commands append through `AuditLog`.
The next entry's object is created exclusively, so two writers never both write one seq and
the chain never forks; the loser reads the new head and tries the next seq.
"""

import hashlib
import json
import os
import posixpath
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from cloud.feedback.store import filesystem

GENESIS = "0" * 64
EVENTS = frozenset({
    "publish", "promote", "reject_candidate", "key_use", "rollout_ack", "feedback_refused", "enroll", "revoke",
    "rollback", "name_label",
})
ACTORS = frozenset({"retrainer", "fleet", "ca", "operator"})
# Data keys that tie an entry to a model version (`lineage`).
VERSION_KEYS = ("version", "rollback_of")
_ENTRY = re.compile(r"(\d{12})\.json")
# Conflicts mean other writers are appending; each retry starts from the head they left.
_MAX_ATTEMPTS = 100


class AuditError(Exception):
    """The chain is broken at entry `seq`, or cannot be appended to."""

    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem if seq is None else f"audit entry {seq}: {problem}")
        self.seq = seq


def audit_uri(feedback_uri: str) -> str:
    """The audit log beside the feedback store's task partitions: dataset discovery skips '_' names."""
    path, query = feedback_uri.partition("?")[::2]
    return f"{path.rstrip('/')}/_audit" + (f"?{query}" if query else "")


def entry_hash(entry: dict[str, Any]) -> str:
    """sha256 of the entry's canonical JSON (sorted keys, no spaces), `hash` left out."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


class AuditLog:
    """Appends and reads one audit log. Safe to share between threads; several processes may
    append at once on a local filesystem. Other filesystems (object stores) cannot create an
    object only if it is absent through pyarrow, so there the log needs a single writer (the
    fleet's audit writer, as `k8s/` deploys it)."""

    def __init__(self, uri: str) -> None:
        """`uri`: a local directory or a pyarrow filesystem URI (the same forms as the feedback store's)."""
        self.uri = uri
        self._fs, self._root = filesystem(uri)
        self._local = isinstance(self._fs, pafs.LocalFileSystem)
        self._lock = threading.Lock()
        self._head: tuple[int, str] | None = None  # (seq, hash) of the last entry this writer knows

    def append(self, event: str, actor: str, **data: Any) -> dict[str, Any]:
        """Adds an entry after the current head; returns it, with its seq and hash."""
        if event not in EVENTS:
            raise ValueError(f"audit event {event!r} is not one of {sorted(EVENTS)}")
        if actor not in ACTORS:
            raise ValueError(f"audit actor {actor!r} is not one of {sorted(ACTORS)}")
        with self._lock:
            for _ in range(_MAX_ATTEMPTS):
                seq, prev = self._head if self._head is not None else self._find_head()
                entry = {
                    "seq": seq + 1,
                    "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "event": event,
                    "actor": actor,
                    "data": data,
                    "prev": prev,
                }
                entry["hash"] = entry_hash(entry)
                if self._create(_name(seq + 1), _canonical(entry) + b"\n"):
                    self._head = (seq + 1, entry["hash"])
                    return entry
                self._head = None  # another writer took seq + 1: start again from the new head
        raise AuditError(None, f"{self.uri}: no free entry after {_MAX_ATTEMPTS} attempts")

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, by seq, as stored (unchecked: see `verify`)."""
        return [self._read(path) for _, path in self._listing()]

    def verify(self) -> int:
        """Recomputes the chain; returns the number of entries, or raises AuditError naming the
        first entry that is missing, unreadable, out of place, changed or not chained to the one before."""
        prev, count = GENESIS, 0
        for expected, (seq, path) in enumerate(self._listing()):
            if seq != expected:
                raise AuditError(expected, "missing (removed from the log)")
            try:
                entry = self._read(path)
            except ValueError as exc:
                raise AuditError(seq, f"unreadable: {exc}") from None
            if entry.get("seq") != seq:
                raise AuditError(seq, f"holds entry {entry.get('seq')} (entries moved or reordered)")
            if entry.get("hash") != entry_hash(entry):
                raise AuditError(seq, "changed: its content does not match its hash")
            if entry.get("prev") != prev:
                raise AuditError(seq, "does not follow the entry before it (that entry was changed or replaced)")
            prev, count = entry["hash"], count + 1
        return count

    def head(self) -> dict[str, Any] | None:
        """The last entry, or None for an empty log."""
        listing = self._listing()
        return self._read(listing[-1][1]) if listing else None

    def lineage(self, version: str) -> list[dict[str, Any]]:
        """The entries about `version` (publish, promote, reject_candidate, key_use, rollout_ack,
        rollback), oldest first."""
        return [e for e in self.entries() if version in (e.get("data", {}).get(k) for k in VERSION_KEYS)]

    def _find_head(self) -> tuple[int, str]:
        listing = self._listing()
        if not listing:
            return -1, GENESIS
        seq, path = listing[-1]
        return seq, self._read(path)["hash"]

    def _listing(self) -> list[tuple[int, str]]:
        """(seq, path) of every entry object, by seq; temporary files start with '.' and never match."""
        selector = pafs.FileSelector(self._root, allow_not_found=True)
        found = []
        for info in self._fs.get_file_info(selector):
            match = _ENTRY.fullmatch(info.base_name)
            if match and info.type == pafs.FileType.File:
                found.append((int(match.group(1)), info.path))
        return sorted(found)

    def _read(self, path: str) -> dict[str, Any]:
        with self._fs.open_input_stream(path) as f:
            entry = json.loads(f.read())
        if not isinstance(entry, dict):
            raise ValueError(f"{path} is not a JSON object")
        return entry

    def _create(self, name: str, data: bytes) -> bool:
        """Writes `name` whole if it does not exist yet; False if another writer has it."""
        path = posixpath.join(self._root, name)
        if self._local:
            return _create_local(Path(path), data)
        # Single writer (see the class): the check and the upload are not one step here.
        if self._fs.get_file_info(path).type != pafs.FileType.NotFound:
            return False
        self._fs.create_dir(self._root)
        with self._fs.open_output_stream(path) as f:  # object stores publish an object whole
            f.write(data)
        return True


def _create_local(path: Path, data: bytes) -> bool:
    """Exclusive creation that never shows a half-written entry: the entry is written and
    fsynced under a temporary name, then hard-linked to its final name, which fails if that
    name exists (like O_CREAT|O_EXCL, but whole or not at all after a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _name(seq: int) -> str:
    return f"{seq:012d}.json"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
