"""The feedback outbox: records kept in SQLite until the cloud acknowledges them.

WAL journal with `synchronous=FULL`: a commit returns only once the WAL is fsynced, so an
accepted record survives a power cut as well as a killed daemon. (`NORMAL` in WAL mode
survives SIGKILL, the OS still holding the write, but may lose the last commits when the
device loses power, which kiosks and vehicles do.) Bounded by records and by bytes: when
full, new records are refused and accepted ones are never evicted. Delivered rows are
deleted; rows the cloud refuses for good move to the `dead` table (itself bounded, oldest
dropped first), kept for inspection and `redrive` instead of retried forever.
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
    """Thread-safe: one connection behind a lock, used from worker threads off the event loop.

    Opening a file that is not an SQLite database (or is corrupt) raises sqlite3.DatabaseError.
    """

    def __init__(
        self,
        path: Path,
        max_records: int,
        max_bytes: int | None = None,
        max_dead: int | None = None,
        journal_size_limit_bytes: int | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._max = max_records
        self._max_bytes = max_bytes
        self._max_dead = max_dead
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        try:
            self._open(path, journal_size_limit_bytes)
        except sqlite3.Error:
            self._db.close()
            raise

    def _open(self, path: Path, journal_size_limit_bytes: int | None) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        if journal_size_limit_bytes is not None:
            self._db.execute(f"PRAGMA journal_size_limit={int(journal_size_limit_bytes)}")
        self._db.executescript(SCHEMA)
        # Kept in memory: scanning the table costs, and every add checks the bounds.
        depth, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox").fetchone()
        self._depth: int = depth
        self._bytes: int = size
        self._dead: int = self._db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]

    @property
    def depth(self) -> int:
        """Records waiting for delivery."""
        return self._depth

    @property
    def size_bytes(self) -> int:
        """Serialized bytes of the records waiting."""
        return self._bytes

    @property
    def dead_count(self) -> int:
        """Records in the `dead` table."""
        return self._dead

    def add(self, record: fleet_pb2.FeedbackRecord) -> bool:
        """`add_many` of one record."""
        return self.add_many([record])[0]

    def add_many(self, records: list[fleet_pb2.FeedbackRecord]) -> list[bool]:
        """Commits the records durably in one transaction (one sync to disk for all); for each,
        False, storing nothing, when the outbox is full (records or bytes). Adding a record_id
        already waiting is a no-op that returns True."""
        payloads = [r.SerializeToString() for r in records]
        with self._lock:
            accepted, added, size = [], 0, 0
            with self._db:
                for record, payload in zip(records, payloads, strict=True):
                    fits = self._fits(added + 1, size + len(payload))
                    accepted.append(fits)
                    if fits and self._db.execute("INSERT OR IGNORE INTO outbox (record_id, payload) VALUES (?, ?)",
                                                 (record.record_id, payload)).rowcount:
                        added, size = added + 1, size + len(payload)
            self._count(added, size)  # counted once committed
        return accepted

    def oldest(self, n: int) -> list[fleet_pb2.FeedbackRecord]:
        """Up to `n` waiting records, oldest first; they stay until `remove`, `bury` or `defer`."""
        with self._lock:
            rows = self._db.execute("SELECT payload FROM outbox ORDER BY seq LIMIT ?", (n,)).fetchall()
            if len(rows) < n:
                # All of the outbox is in hand: recount for free, correcting the counts after
                # another process (`redrive` from the command line) changed the file.
                self._depth, self._bytes = len(rows), sum(len(payload) for (payload,) in rows)
        return [fleet_pb2.FeedbackRecord.FromString(payload) for (payload,) in rows]

    def remove(self, record_ids: list[str]) -> None:
        """Deletes acknowledged records."""
        with self._lock:
            with self._db:
                count, size = self._delete(record_ids)
            self._count(-count, -size)

    def defer(self, record_id: str) -> None:
        """Moves a waiting record to the back of the queue: it is retried after the others."""
        with self._lock, self._db:
            self._db.execute(
                "UPDATE outbox SET seq = (SELECT MAX(seq) FROM outbox) + 1 WHERE record_id = ?", (record_id,)
            )

    def bury(self, records: list[fleet_pb2.FeedbackRecord], error: str) -> int:
        """Moves records the cloud refused for good into `dead`, with the refusal, in one
        transaction; drops the oldest dead records beyond `max_dead`. Returns how many it dropped."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO dead (record_id, payload, error, buried_unix_ms) VALUES (?, ?, ?, ?)",
                    [(r.record_id, r.SerializeToString(), error, now_ms) for r in records],
                )
                dead = self._db.execute("SELECT COUNT(*) FROM dead").fetchone()[0]
                dropped = max(0, dead - self._max_dead) if self._max_dead is not None else 0
                self._db.execute(
                    "DELETE FROM dead WHERE record_id IN "
                    "(SELECT record_id FROM dead ORDER BY buried_unix_ms, record_id LIMIT ?)", (dropped,)
                )
                count, size = self._delete([r.record_id for r in records])
            self._count(-count, -size)
            self._dead = dead - dropped
        return dropped

    def dead(self) -> list[tuple[fleet_pb2.FeedbackRecord, str]]:
        """Buried records and why the cloud refused them, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT payload, error FROM dead ORDER BY buried_unix_ms, record_id").fetchall()
        return [(fleet_pb2.FeedbackRecord.FromString(payload), error) for payload, error in rows]

    def redrive(self) -> tuple[int, int]:
        """Moves dead records to the back of the outbox, oldest first, as many as its bounds
        allow, to be delivered again once the cause is fixed. Returns (moved, still dead)."""
        with self._lock:
            rows = self._db.execute("SELECT record_id, payload FROM dead ORDER BY buried_unix_ms, record_id").fetchall()
            moved = size = 0
            with self._db:
                for record_id, payload in rows:
                    if not self._fits(moved + 1, size + len(payload)):
                        break
                    self._db.execute("INSERT OR IGNORE INTO outbox (record_id, payload) VALUES (?, ?)",
                                     (record_id, payload))
                    self._db.execute("DELETE FROM dead WHERE record_id = ?", (record_id,))
                    moved, size = moved + 1, size + len(payload)
            self._count(moved, size)
            self._dead -= moved
            return moved, self._dead

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _fits(self, records: int, size: int) -> bool:
        if self._depth + records > self._max:
            return False
        return self._max_bytes is None or self._bytes + size <= self._max_bytes

    def _delete(self, record_ids: list[str]) -> tuple[int, int]:
        """Deletes waiting records inside the caller's transaction; (records, bytes) removed."""
        count = size = 0
        for record_id in record_ids:
            row = self._db.execute("SELECT length(payload) FROM outbox WHERE record_id = ?", (record_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM outbox WHERE record_id = ?", (record_id,))
                count, size = count + 1, size + row[0]
        return count, size

    def _count(self, records: int, size: int) -> None:
        """Counts records (and their bytes) a committed transaction added to the queue, or took out."""
        self._depth += records
        self._bytes += size
