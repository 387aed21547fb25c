"""The feedback store: an append-only Parquet dataset on any pyarrow filesystem.

    <root>/task=<task>/date=<YYYY-MM-DD>/part-<uuid>.parquet

Hive-partitioned by task and the UTC day of storage, so a retrainer reads one task's
records, or a range of days, with pyarrow.dataset alone. Every append writes new files and
never touches old ones; each file appears whole or not at all.
"""

import threading
import time
import uuid
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cloud.feedback.records import PARTITIONS, SCHEMA, to_table
from tandem.fsio import atomic_write
from tandem.v1 import fleet_pb2

HIVE = ds.partitioning(PARTITIONS, flavor="hive")


class FeedbackStore:
    """Stores feedback records once each, by record_id (per task).

    The ids stored in the last `dedup_days` days are kept in memory, by day, loaded per task
    on its first append (only those days' partitions are read), so an append reads nothing
    back and memory stays bounded. A record sent again later than that is stored again, as
    is one that a second writer (another process or Serve replica) on the same dataset
    receives at the same time; `read` hides such copies.

    Safe to call from several threads; blocking I/O, so async callers use a thread.
    """

    def __init__(self, uri: str, dedup_days: int = 30) -> None:
        """`uri`: a local directory or a pyarrow filesystem URI (s3://bucket/feedback?region=...).
        `dedup_days`: longer than an edge's outbox holds records while the cloud is away."""
        self._fs, self._root = _filesystem(uri)
        self._window = timedelta(days=dedup_days)
        self._ids: dict[str, dict[date, set[str]]] = {}
        self._lock = threading.Lock()

    def append(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> tuple[int, int]:
        """(stored, duplicates): see `add`."""
        new = self.add(records)
        return len(new), len(records) - len(new)

    def add(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> list[fleet_pb2.FeedbackRecord]:
        """Stores the records whose id is neither stored yet nor earlier in the batch, one file
        per task, and returns them. The records are valid: the Fleet boundary checked them
        (`cloud.feedback.records.check`), and the experts build theirs from checked escalations."""
        with self._lock:
            now = time.time()
            day = datetime.fromtimestamp(now, timezone.utc).date()
            new = self._unseen(records, day)
            for task, group in groupby(sorted(new, key=lambda r: r.task), key=lambda r: r.task):
                batch = list(group)
                self._write(f"{self._root}/task={task}/date={day.isoformat()}", to_table(batch, int(now * 1000)))
                days = self._ids[task]
                days.setdefault(day, set()).update(r.record_id for r in batch)
                for old in [d for d in days if d < day - self._window]:
                    del days[old]
        return new

    def read(self, task: str) -> pa.Table:
        """All records of `task` (SCHEMA), each id once (its first stored copy), oldest first."""
        table = self._scan(task).sort_by([("stored_unix_ms", "ascending"), ("record_id", "ascending")])
        rows = pa.array(range(len(table)), pa.int64())
        first = table.select(["record_id"]).append_column("row", rows).group_by("record_id", use_threads=False)
        return table.take(first.aggregate([("row", "min")])["row_min"].sort())

    def _unseen(self, records: Sequence[fleet_pb2.FeedbackRecord], today: date) -> list[fleet_pb2.FeedbackRecord]:
        batch: set[tuple[str, str]] = set()
        new = []
        for r in records:
            key = (r.task, r.record_id)
            days = self._stored_ids(r.task, today)
            if key not in batch and not any(r.record_id in ids for ids in days.values()):
                batch.add(key)
                new.append(r)
        return new

    def _stored_ids(self, task: str, today: date) -> dict[date, set[str]]:
        if task not in self._ids:
            recent = ds.field("date") >= pa.scalar(today - self._window, pa.date32())
            table = self._scan(task, ["record_id", "date"], recent)
            days: dict[date, set[str]] = {}
            for record_id, day in zip(table["record_id"].to_pylist(), table["date"].to_pylist(), strict=True):
                days.setdefault(day, set()).add(record_id)
            self._ids[task] = days
        return self._ids[task]

    def _scan(self, task: str, columns: list[str] | None = None, where: ds.Expression | None = None) -> pa.Table:
        directory = f"{self._root}/task={task}"
        if self._fs.get_file_info(directory).type == pafs.FileType.NotFound:
            return SCHEMA.empty_table().select(columns or SCHEMA.names)
        # Discovery skips names starting with '.' or '_': an unfinished temporary file is never read.
        dataset = ds.dataset(directory, schema=SCHEMA, format="parquet", filesystem=self._fs,
                             partitioning=HIVE, partition_base_dir=self._root)
        return dataset.to_table(columns=columns, filter=where)

    def _write(self, directory: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path = f"{directory}/part-{uuid.uuid4().hex}.parquet"
        self._fs.create_dir(directory)
        if isinstance(self._fs, pafs.LocalFileSystem):
            atomic_write(Path(path), sink.getvalue().to_pybytes())
        else:
            # Object stores (S3 and compatible, GCS) make an object visible only once its
            # upload completes, a single PUT or a completed multipart upload: the final name
            # is already atomic, and a rename there would be a copy.
            with self._fs.open_output_stream(path) as f:
                f.write(sink.getvalue())


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:  # a plain path; from_uri wants it absolute
        uri = str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)
