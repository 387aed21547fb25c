"""The feedback outbox: records kept in SQLite until the cloud acknowledges them.

WAL journal with `synchronous=FULL`: a commit returns only once the WAL is fsynced, so an
accepted record survives a power cut as well as a killed daemon. (`NORMAL` in WAL mode
survives SIGKILL, the OS still holding the write, but may lose the last commits when the
device loses power, which kiosks and vehicles do.) Bounded: when full, new records are
refused and accepted ones are never evicted. Delivered rows are deleted; rows the cloud
refuses as invalid move to the `dead` table, kept for inspection instead of retried forever.
"""

import sqlite3
import threading
import time
from pathlib import Path

from tandem.v1 import fleet_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,  -- delivery order; an alias of rowid, so stable under VACUUM
    record_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL     -- a serialized tandem.v1.FeedbackRecord
);
CREATE TABLE IF NOT EXISTS dead (
    record_id TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    error TEXT NOT NULL,
    buried_unix_ms INTEGER NOT NULL
);
"""


class Outbox:
    """Thread-safe: one connection behind a lock, used from worker threads off the event loop."""

    def __init__(self, path: Path, max_records: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._max = max_records
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        # Kept in memory: COUNT(*) scans the table, and every add checks the bound.
        self._depth: int = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    @property
    def depth(self) -> int:
        """Records waiting for delivery."""
        return self._depth

    def add(self, record: fleet_pb2.FeedbackRecord) -> bool:
        """Commits the record durably; False, storing nothing, when the outbox is full.
        Adding a record_id already waiting is a no-op that returns True."""
        with self._lock, self._db:
            if self._depth >= self._max:
                return False
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO outbox (record_id, payload) VALUES (?, ?)",
                (record.record_id, record.SerializeToString()),
            )
            self._depth += cursor.rowcount
            return True

    def oldest(self, n: int) -> list[fleet_pb2.FeedbackRecord]:
        """Up to `n` waiting records, oldest first; they stay until `remove` or `bury`."""
        with self._lock:
            rows = self._db.execute("SELECT payload FROM outbox ORDER BY seq LIMIT ?", (n,)).fetchall()
        return [fleet_pb2.FeedbackRecord.FromString(payload) for (payload,) in rows]

    def remove(self, record_ids: list[str]) -> None:
        """Deletes acknowledged records."""
        with self._lock, self._db:
            self._depth -= self._delete(record_ids)

    def bury(self, records: list[fleet_pb2.FeedbackRecord], error: str) -> None:
        """Moves records the cloud refused into `dead`, with the refusal, in one transaction."""
        now_ms = int(time.time() * 1000)
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO dead (record_id, payload, error, buried_unix_ms) VALUES (?, ?, ?, ?)",
                [(r.record_id, r.SerializeToString(), error, now_ms) for r in records],
            )
            self._depth -= self._delete([r.record_id for r in records])

    def dead(self) -> list[tuple[fleet_pb2.FeedbackRecord, str]]:
        """Buried records and why the cloud refused them, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT payload, error FROM dead ORDER BY buried_unix_ms, record_id").fetchall()
        return [(fleet_pb2.FeedbackRecord.FromString(payload), error) for payload, error in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _delete(self, record_ids: list[str]) -> int:
        return self._db.executemany("DELETE FROM outbox WHERE record_id = ?", [(i,) for i in record_ids]).rowcount
