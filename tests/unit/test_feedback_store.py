import logging
import os
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cloud.errors import InvalidFeedback
from cloud.feedback import FeedbackStore
from cloud.feedback.receipts import escalation_record
from cloud.feedback.records import SCHEMA, LabelSet, check, to_table
from tandem.v1 import common_pb2, expert_pb2, fleet_pb2

TASKS = {"t": LabelSet(frozenset({"card_arrival", "lost_card"}), 1), "u": LabelSet(frozenset({"card_arrival"}), 1)}
NOW_MS = 1_700_000_000_000


def _append(store: FeedbackStore, records: list[fleet_pb2.FeedbackRecord]) -> tuple[int, int]:
    """(stored, duplicates) of one `add`."""
    new = store.add(records)
    return len(new), len(records) - len(new)


def _record(record_id: str, task: str = "t", kind: int = fleet_pb2.CORRECTION, **fields: object) -> fleet_pb2.FeedbackRecord:
    values = {"text": f"text of {record_id}", "label": "card_arrival", "created_unix_ms": NOW_MS, **fields}
    return fleet_pb2.FeedbackRecord(record_id=record_id, task=task, kind=kind, **values)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_same_batch_sent_twice_is_stored_once(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    batch = [_record("r1"), _record("r2", kind=fleet_pb2.FALLBACK, label=""), _record("r3")]
    assert _append(store, batch) == (3, 0)
    assert _append(store, batch) == (0, 3)
    assert store.read("t")["record_id"].to_pylist() == ["r1", "r2", "r3"]
    assert len(_files(tmp_path)) == 1, "a batch of duplicates must write nothing"


def test_duplicates_within_a_batch_are_stored_once(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    assert _append(store, [_record("r1"), _record("r1", text="again"), _record("r2")]) == (2, 1)
    assert store.read("t")["text"].to_pylist() == ["text of r1", "text of r2"]


def test_a_new_store_on_the_same_directory_knows_what_is_stored(tmp_path: Path) -> None:
    _append(FeedbackStore(str(tmp_path)), [_record("r1"), _record("r2")])
    assert _append(FeedbackStore(str(tmp_path)), [_record("r2"), _record("r3")]) == (1, 1)


def test_the_id_index_covers_a_window_of_days_and_read_hides_older_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cloud.feedback.store as store_module

    today = datetime.now(timezone.utc).timestamp()
    monkeypatch.setattr(store_module.time, "time", lambda: today - 40 * 86400)
    _append(FeedbackStore(str(tmp_path)), [_record("old")])
    monkeypatch.setattr(store_module.time, "time", lambda: today - 2 * 86400)
    _append(FeedbackStore(str(tmp_path)), [_record("recent")])
    monkeypatch.setattr(store_module.time, "time", lambda: today)
    store = FeedbackStore(str(tmp_path), dedup_days=30)  # reads back only the last 30 days' ids
    assert _append(store, [_record("recent"), _record("old")]) == (1, 1)  # "old" is past the window
    assert sorted(store.read("t")["record_id"].to_pylist()) == ["old", "recent"]


def test_records_are_partitioned_by_task_and_day_with_the_documented_columns(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    escalation = _record(
        "esc-1", kind=fleet_pb2.ESCALATION, request_id="req-1", expert="classifier", device_id="kiosk-7",
        edge=common_pb2.EdgePrediction(label="lost_card", confidence=0.5, model_version="v1"),
        distribution=[common_pb2.LabelScore(label="card_arrival", probability=0.75)],
    )
    _append(store, [escalation, _record("u-1", task="u")])
    today = datetime.now(timezone.utc).date()
    assert [f.rsplit("/", 1)[0] for f in _files(tmp_path)] == [f"task=t/date={today}", f"task=u/date={today}"]
    assert all(f.rsplit("/", 1)[1].startswith("part-") for f in _files(tmp_path))
    table = store.read("t")
    assert table.schema == SCHEMA
    row = table.to_pylist()[0]
    stored = row.pop("stored_unix_ms")
    assert abs(stored - datetime.now(timezone.utc).timestamp() * 1000) < 60_000
    assert row == {
        "record_id": "esc-1", "request_id": "req-1", "kind": "ESCALATION", "text": "text of esc-1",
        "edge_label": "lost_card", "edge_confidence": 0.5, "edge_model_version": "v1", "label": "card_arrival",
        "distribution": [{"label": "card_arrival", "probability": 0.75}], "expert": "classifier",
        "device_id": "kiosk-7", "created_unix_ms": NOW_MS, "task": "t", "date": today,
    }
    assert store.read("u")["record_id"].to_pylist() == ["u-1"]
    assert store.read("absent").num_rows == 0 and store.read("absent").schema == SCHEMA


def test_a_failed_write_leaves_nothing_visible_and_can_be_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FeedbackStore(str(tmp_path))
    _append(store, [_record("r1")])

    def crash(src: str, dst: str) -> None:  # the temporary file is written; the rename never happens
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        _append(store, [_record("r2")])
    monkeypatch.undo()
    assert store.read("t")["record_id"].to_pylist() == ["r1"]
    assert len(_files(tmp_path)) == 1
    assert _append(store, [_record("r2")]) == (1, 0)


def test_a_temporary_file_left_by_a_crash_is_never_read(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    _append(store, [_record("r1")])
    partition = next(tmp_path.rglob("part-*")).parent
    (partition / ".part-crashed.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert FeedbackStore(str(tmp_path)).read("t")["record_id"].to_pylist() == ["r1"]


def test_read_hides_a_copy_stored_by_a_second_writer(tmp_path: Path) -> None:
    first, second = FeedbackStore(str(tmp_path)), FeedbackStore(str(tmp_path))
    _append(first, [_record("r0")])
    _append(second, [_record("r00")])  # both have loaded their id index now
    assert _append(first, [_record("r1")]) == _append(second, [_record("r1")]) == (1, 0)
    assert first.read("t")["record_id"].to_pylist() == ["r0", "r00", "r1"]


def test_concurrent_appends_store_each_record_once(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    results: list[tuple[int, int]] = []
    threads = [threading.Thread(target=lambda: results.append(_append(store, [_record(f"r{i}") for i in range(20)])))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [(0, 20)] * 3 + [(20, 0)]
    assert store.read("t").num_rows == 20


def test_a_filesystem_uri_serves_as_well() -> None:
    """pyarrow's in-memory mock:// filesystem stands in for s3://: no rename, one write per file."""
    store = FeedbackStore("mock:///bucket/feedback")
    assert _append(store, [_record("r1"), _record("r1")]) == (1, 1)
    assert _append(store, [_record("r1"), _record("r2")]) == (1, 1)
    assert store.read("t")["record_id"].to_pylist() == ["r1", "r2"]


def test_a_file_uri_is_a_local_directory(tmp_path: Path) -> None:
    _append(FeedbackStore(tmp_path.as_uri()), [_record("r1")])
    assert FeedbackStore(str(tmp_path)).read("t").num_rows == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"record_id": ""}, "records[1].record_id: '' must be 1 to 128 printable ASCII characters"),
        ({"record_id": "x" * 129}, "records[1].record_id"),
        ({"record_id": "has space"}, "records[1].record_id"),
        ({"task": "weather"}, "records[1].task: unknown task 'weather'; the cloud has ['t', 'u']"),
        ({"task": "../t"}, "records[1].task: invalid name '../t'"),
        ({"request_id": "has space\n"}, "records[1].request_id: at most 128 printable ASCII characters"),
        ({"kind": fleet_pb2.FEEDBACK_KIND_UNSPECIFIED}, "records[1].kind: must be one of ESCALATION, CORRECTION, FALLBACK, AUDIT"),
        ({"kind": 9}, "records[1].kind"),
        ({"text": "  "}, "records[1].text: must not be empty or blank"),
        ({"device_id": "d" * 129}, "records[1].device_id: 129 characters exceed the limit of 128"),
        ({"text": "é" * 1025}, "records[1].text: 2050 bytes exceeds the limit of 2048 bytes"),
        ({"label": ""}, "records[1].label: required for CORRECTION records"),
        ({"label": "weather"}, "records[1].label_set_version: 0 is not newer than the cloud's version 1 of task t's "
                               "label set, which lacks records[1].label: 'weather' is not a label of task t"),
        # A label from a newer label set than the cloud's: refused on `label`, which edges retry.
        ({"label": "weather", "label_set_version": 2},
         "records[1].label: 'weather' is not a label of task t: version 1 of its label set; the record's version 2 is newer"),
        ({"created_unix_ms": 0}, "records[1].created_unix_ms: must be set"),
    ],
)
def test_invalid_records_are_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    values = {"record_id": "bad", "task": "t", "kind": fleet_pb2.CORRECTION, **fields}
    record = _record(values.pop("record_id"), values.pop("task"), values.pop("kind"), **values)
    with pytest.raises(InvalidFeedback) as info:
        check([_record("good"), record], TASKS)
    assert message in str(info.value) and info.value.field == message.split(":")[0]


def test_without_a_task_list_any_safe_task_name_and_label_pass(tmp_path: Path) -> None:
    record = _record("r1", task="anything", label="whatever")
    check([record], None)
    store = FeedbackStore(str(tmp_path))
    assert _append(store, [record]) == (1, 0)
    assert store.read("anything")["label"].to_pylist() == ["whatever"]


def test_escalation_record_ids_are_stable_per_device_and_request() -> None:
    answer = expert_pb2.EscalateResponse(label="card_arrival")

    def record_id(device: str, request: str) -> str:
        request_pb = expert_pb2.EscalateRequest(request_id=request, task="banking77", text="where is my card", device_id=device)
        record = escalation_record(request_pb, answer, 1_700_000_000_000)
        check([record], None)  # any request id, even with spaces or 128 characters, gives a valid id
        return record.record_id

    assert record_id("kiosk-1", "1") == record_id("kiosk-1", "1")  # delivered twice: stored once
    assert record_id("kiosk-1", "1") != record_id("kiosk-2", "1")  # two devices' request 1 both kept
    assert record_id("kiosk-1", "a b " * 32).startswith("esc/kiosk-1/")  # under the device, where no device's own ids are


def _valid_parquet() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(to_table([_record("x")], NOW_MS), sink)
    return sink.getvalue().to_pybytes()


# What a damaged disk or upload leaves: garbage, or a file cut short.
DAMAGED = {
    "garbage": lambda: b"\x00\xffnot parquet at all" * 64,
    "truncated": lambda: _valid_parquet()[:-40],
}


def _damage(root: Path, kind: str) -> tuple[Path, bytes]:
    """A damaged file placed in task t's partition beside the good ones."""
    partition = next(root.glob("task=t/date=*"))
    bad, data = partition / "part-damaged.parquet", DAMAGED[kind]()
    bad.write_bytes(data)
    return bad, data


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_a_damaged_file_is_quarantined_and_intake_goes_on(tmp_path: Path, kind: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    _append(FeedbackStore(str(tmp_path)), [_record("r1")])
    bad, data = _damage(tmp_path, kind)
    quarantined: list[tuple[str, str]] = []
    store = FeedbackStore(str(tmp_path), on_quarantine=lambda task, path: quarantined.append((task, path)))
    assert _append(store, [_record("r1"), _record("r2")]) == (1, 1), "the id index loads past the damaged file"
    moved = tmp_path / "_quarantine" / bad.relative_to(tmp_path)
    assert not bad.exists() and moved.read_bytes() == data, "moved aside whole, never deleted"
    assert quarantined == [("t", str(bad))]
    assert any(r.levelno == logging.ERROR and str(bad) in r.getMessage() for r in caplog.records)
    assert store.read("t")["record_id"].to_pylist() == ["r1", "r2"]


def test_the_retrainers_read_quarantines_a_damaged_file_too(tmp_path: Path) -> None:
    _append(FeedbackStore(str(tmp_path)), [_record("r1"), _record("r2")])
    bad, _ = _damage(tmp_path, "garbage")
    assert FeedbackStore(str(tmp_path)).read("t")["record_id"].to_pylist() == ["r1", "r2"]
    assert (tmp_path / "_quarantine" / bad.relative_to(tmp_path)).exists()
    assert FeedbackStore(str(tmp_path)).read("t").num_rows == 2


def _part_files(root: Path, task: str = "t") -> list[Path]:
    return sorted(root.glob(f"task={task}/date=*/part-*.parquet"))


def _raw_ids(root: Path, task: str = "t") -> list[str]:
    return [i for path in _part_files(root, task) for i in pq.read_table(path)["record_id"].to_pylist()]


def test_compaction_rewrites_a_partition_of_small_files_as_one_and_keeps_every_record(tmp_path: Path) -> None:
    store, second = FeedbackStore(str(tmp_path)), FeedbackStore(str(tmp_path))
    _append(second, [_record("s0")])  # loads the second writer's id index before the first writes
    for i in range(100):  # two records a file, as experts flushing every second left them
        _append(store, [_record(f"r{i}a"), _record(f"r{i}b")])
    _append(second, [_record("r0a")])  # a second writer's copy: a duplicate in the raw files
    _append(store, [_record("u1", task="u")])
    records, files = len(_raw_ids(tmp_path)), len(_part_files(tmp_path))
    assert len(set(_raw_ids(tmp_path))) == records - 1
    before = store.read("t")

    assert store.compact("t") == files - 1
    after = len(_part_files(tmp_path))
    print(f"files per 1,000 records: {files / records * 1000:.0f} before compaction, {after / records * 1000:.0f} after")
    assert (records, files, after) == (202, 102, 1)
    assert sorted(_raw_ids(tmp_path)) == sorted(before["record_id"].to_pylist()), "each record once, none lost"
    assert store.read("t").equals(before)
    assert len(_part_files(tmp_path, "u")) == 1 and store.compact("u") == 0
    assert _append(store, [_record("r5a"), _record("r200")]) == (1, 1)


def test_a_compaction_cut_short_before_its_deletes_loses_nothing(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    for i in range(3):
        _append(store, [_record(f"r{i}")])
    before = store.read("t")
    partition = _part_files(tmp_path)[0].parent
    saved = tmp_path / "saved"
    shutil.copytree(partition, saved)
    store.compact("t")
    for old in saved.iterdir():  # the state a crash after the rename, before the deletes, leaves
        shutil.copy(old, partition / old.name)
    assert len(_part_files(tmp_path)) == 4 and store.read("t").equals(before)
    store.compact("t")
    assert len(_part_files(tmp_path)) == 1 and store.read("t").equals(before)


def test_compaction_sets_a_damaged_file_aside_and_keeps_the_rest(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path))
    _append(store, [_record("r1")])
    _append(store, [_record("r2")])
    bad, _ = _damage(tmp_path, "truncated")
    assert FeedbackStore(str(tmp_path)).compact("t") == 2
    assert (tmp_path / "_quarantine" / bad.relative_to(tmp_path)).exists()
    assert len(_part_files(tmp_path)) == 1 and store.read("t")["record_id"].to_pylist() == ["r1", "r2"]


def test_compaction_works_on_an_object_store() -> None:
    store = FeedbackStore("mock:///bucket/feedback")
    for i in range(3):
        _append(store, [_record(f"r{i}")])
    assert store.compact("t") == 2 and store.compact("t") == 0
    assert store.read("t")["record_id"].to_pylist() == ["r0", "r1", "r2"]
    assert store.compact("absent") == 0


def test_the_retrainer_compacts_the_task_before_reading_it(tmp_path: Path) -> None:
    from cloud.training.distill_data import read_feedback

    store = FeedbackStore(str(tmp_path))
    for i in range(3):
        _append(store, [_record(f"r{i}")])
    assert [f.text for f in read_feedback(str(tmp_path), "t")] == ["text of r0", "text of r1", "text of r2"]
    assert len(_part_files(tmp_path)) == 1


class FlakyDisk(pafs.FSSpecHandler):
    """The local disk through pyarrow's Python filesystem, failing every file read while `down`."""

    def __init__(self) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.down = False

    def open_input_file(self, path: str) -> Any:
        if self.down:
            raise OSError(f"{path}: connection reset")
        return super().open_input_file(path)

    open_input_stream = open_input_file


def test_a_failing_filesystem_is_an_error_and_quarantines_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cloud.feedback.store as store_module

    _append(FeedbackStore(str(tmp_path)), [_record("r1")])
    disk = FlakyDisk()
    monkeypatch.setattr(store_module, "filesystem", lambda uri: (pafs.PyFileSystem(disk), str(tmp_path)))
    store = FeedbackStore(str(tmp_path))
    disk.down = True
    with pytest.raises(OSError, match="connection reset"):
        store.read("t")
    assert len(_part_files(tmp_path)) == 1 and not (tmp_path / "_quarantine").exists()
    disk.down = False
    assert store.read("t")["record_id"].to_pylist() == ["r1"]
