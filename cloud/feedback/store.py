"""The feedback store: an append-only Parquet dataset on any pyarrow filesystem.

    <root>/task=<task>/date=<YYYY-MM-DD>/part-<uuid>.parquet
    <root>/_quarantine/task=<task>/date=<YYYY-MM-DD>/part-<uuid>.parquet   (unreadable files, set aside)

Hive-partitioned by task and the UTC day of storage, so a retrainer reads one task's
records, or a range of days, with pyarrow.dataset alone. Every append writes new files and
never touches old ones; each file appears whole or not at all. `compact` rewrites a
partition's files as one.
"""

import logging
import posixpath
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta, timezone
from itertools import groupby
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cloud.feedback.records import FILE_SCHEMA, PARTITIONS, SCHEMA, to_table
from tandem.fsio import atomic_write
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)

HIVE = ds.partitioning(PARTITIONS, flavor="hive")
# Under the root, beside the task directories: scans start at a task's directory, and
# dataset discovery skips names starting with '_' besides.
QUARANTINE = "_quarantine"
# What pyarrow raises for a file that is not Parquet of the store's schema (and, for I/O, a
# failing filesystem: `_unparseable` tells the two apart).
READ_ERRORS = (pa.ArrowException, OSError)

OnQuarantine = Callable[[str, str], None]


class FeedbackStore:
    """Stores feedback records once each, by record_id (per task).

    The ids stored in the last `dedup_days` days are kept in memory, by day, loaded per task
    on its first append (only those days' partitions are read), so an append reads nothing
    back and memory stays bounded. A record sent again later than that is stored again, as
    is one that a second writer (another process or Serve replica) on the same dataset
    receives at the same time; `read` hides such copies.

    A file that the filesystem returns but that is not Parquet of the store's schema (a
    damaged disk or upload) would stop every read of its task: it is moved under
    `_quarantine/` (never deleted), logged, and reported to `on_quarantine(task, path)`, and
    the task's other files are read.

    Safe to call from several threads; blocking I/O, so async callers use a thread.
    """

    def __init__(self, uri: str, dedup_days: int = 30, on_quarantine: OnQuarantine | None = None) -> None:
        """`uri`: a local directory or a pyarrow filesystem URI (s3://bucket/feedback?region=...).
        `dedup_days`: longer than an edge's outbox holds records while the cloud is away."""
        self._fs, self._root = filesystem(uri)
        self._window = timedelta(days=dedup_days)
        self._on_quarantine = on_quarantine
        self._ids: dict[str, dict[date, set[str]]] = {}
        self._lock = threading.Lock()

    def add(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> list[fleet_pb2.FeedbackRecord]:
        """Stores the records whose id is neither stored yet nor earlier in the batch, one file
        per task, and returns them. The records are valid: the Fleet boundary checked them
        (`cloud.feedback.records.check`), escalation records once their receipts verified."""
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
        return _first_copies(self._scan(task))

    def device_counts(self, day: date) -> Counter[str]:
        """Records stored on the UTC `day` per device id, of every task, less the escalation
        records (the experts' answers, which devices deliver as signed receipts): the devices'
        own records (the fleet's per-device quota)."""
        if self._fs.get_file_info(self._root).type == pafs.FileType.NotFound:
            return Counter()
        infos = self._fs.get_file_info(pafs.FileSelector(self._root))
        tasks = [i.base_name.removeprefix("task=") for i in infos
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("task=")]
        where = (ds.field("date") == pa.scalar(day, pa.date32())) & (ds.field("kind") != "ESCALATION")
        counts: Counter[str] = Counter()
        for task in tasks:
            counts.update(self._scan(task, ["device_id"], where)["device_id"].to_pylist())
        return counts

    def compact(self, task: str) -> int:
        """Rewrites each partition of `task` that holds several files as one file, each record
        id once (its first stored copy); returns how many files it removed.

        The new file is complete (written under a temporary name and renamed in, or one upload)
        before the old ones are deleted: a crash in between leaves copies, which `read` hides
        and the next compaction removes, never a loss. Files appended meanwhile are left for
        the next compaction. Safe beside a writer, in this process or another."""
        directory = f"{self._root}/task={task}"
        if self._fs.get_file_info(directory).type == pafs.FileType.NotFound:
            return 0
        infos = self._fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_part(i.base_name))
        removed = 0
        for partition, group in groupby(files, key=posixpath.dirname):
            paths = list(group)
            if len(paths) > 1:
                removed += self._compact_partition(task, partition, paths)
        return removed

    def _compact_partition(self, task: str, partition: str, paths: list[str]) -> int:
        table = _first_copies(self._read(task, self._dataset(paths)))
        if table.num_rows:  # none when every file was quarantined
            self._write(partition, table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA))
        for path in paths:
            try:
                self._fs.delete_file(path)
            except FileNotFoundError:  # quarantined while reading, or deleted by another compaction
                pass
        log.info("feedback store: compacted %d files of %s into one (%d records)", len(paths), partition, table.num_rows)
        return len(paths) - 1

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
        return self._read(task, self._dataset(directory), columns, where)

    def _read(self, task: str, dataset: ds.Dataset, columns: list[str] | None = None,
              where: ds.Expression | None = None) -> pa.Table:
        try:
            return dataset.to_table(columns=columns, filter=where)
        except READ_ERRORS:
            # One bad file fails the whole scan: find it, file by file.
            return self._read_files(task, dataset.files, columns, where)

    def _read_files(self, task: str, paths: list[str], columns: list[str] | None = None,
                    where: ds.Expression | None = None) -> pa.Table:
        """The rows of `paths`, less the files that are not Parquet of the schema (quarantined)."""
        tables = []
        for path in paths:
            try:
                tables.append(self._dataset([path]).to_table(columns=columns, filter=where))
            except READ_ERRORS:
                if not self._unparseable(path):
                    raise  # the filesystem failed, not the file: the caller retries later
                self._quarantine(task, path)
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns or SCHEMA.names)

    def _dataset(self, source: str | list[str]) -> ds.Dataset:
        return ds.dataset(source, schema=SCHEMA, format="parquet", filesystem=self._fs,
                          partitioning=HIVE, partition_base_dir=self._root)

    def _unparseable(self, path: str) -> bool:
        """Whether `path` reads back as bytes but not as Parquet of FILE_SCHEMA: a damaged file,
        not a filesystem that failed to read it."""
        try:
            with self._fs.open_input_file(path) as f:
                data = f.read()
        except OSError:
            return False
        try:
            pq.read_table(pa.BufferReader(data), schema=FILE_SCHEMA)
        except READ_ERRORS:
            return True
        return False

    def _quarantine(self, task: str, path: str) -> None:
        target = f"{self._root}/{QUARANTINE}/{path.removeprefix(self._root + '/')}"
        self._fs.create_dir(posixpath.dirname(target))
        self._fs.move(path, target)
        log.error("feedback store: %s is not readable Parquet of the store's schema; moved it to %s, "
                  "and reads of task %s go on without its records", path, target, task)
        if self._on_quarantine is not None:
            self._on_quarantine(task, path)

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


def _first_copies(table: pa.Table) -> pa.Table:
    """`table`'s rows, each record id once (its first stored copy), oldest first."""
    table = table.sort_by([("stored_unix_ms", "ascending"), ("record_id", "ascending")])
    rows = pa.array(range(len(table)), pa.int64())
    first = table.select(["record_id"]).append_column("row", rows).group_by("record_id", use_threads=False)
    return table.take(first.aggregate([("row", "min")])["row_min"].sort())


def _is_part(name: str) -> bool:
    return name.startswith("part-") and name.endswith(".parquet")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of `uri` (a local path or a filesystem URI) and the path in it."""
    if "://" not in uri:  # a plain path; from_uri wants it absolute
        uri = str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)
