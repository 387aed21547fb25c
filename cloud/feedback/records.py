"""Feedback records as stored: the Arrow schema, the checks at the Fleet boundary, proto → rows."""

from collections.abc import Collection, Mapping, Sequence

import pyarrow as pa

from cloud.errors import InvalidFeedback
from tandem.contract import (LABELLED_KINDS, RECORD_ID, FieldError, check_device_id, check_name, check_request_id,
                             check_text)
from tandem.v1 import fleet_pb2

KINDS = {fleet_pb2.FeedbackKind.Value(name): name for name in ("ESCALATION", "CORRECTION", "FALLBACK", "AUDIT")}
# Device ids are stored in every row and hashed into escalation record ids.
DISTRIBUTION = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))
# The columns inside each Parquet file; task and date are its hive partition directories.
FILE_SCHEMA = pa.schema([
    ("record_id", pa.string()),
    ("request_id", pa.string()),
    ("kind", pa.string()),
    ("text", pa.string()),
    ("edge_label", pa.string()),
    ("edge_confidence", pa.float32()),
    ("edge_model_version", pa.string()),
    ("label", pa.string()),
    ("distribution", DISTRIBUTION),
    ("expert", pa.string()),
    ("device_id", pa.string()),
    ("created_unix_ms", pa.int64()),
    ("stored_unix_ms", pa.int64()),
])
# date: the UTC day the record was stored.
PARTITIONS = pa.schema([("task", pa.string()), ("date", pa.date32())])
# The dataset's, and what FeedbackStore.read returns.
SCHEMA = pa.schema([*FILE_SCHEMA, *PARTITIONS])


def check(records: Sequence[fleet_pb2.FeedbackRecord], tasks: Mapping[str, Collection[str]] | None) -> None:
    """InvalidFeedback naming the first bad field; `tasks` (task -> labels), where given,
    limits tasks and labels to the cloud's own."""
    for i, record in enumerate(records):
        try:
            _check(record, f"records[{i}]", tasks)
        except FieldError as exc:
            raise InvalidFeedback.of(exc) from None


def _check(r: fleet_pb2.FeedbackRecord, at: str, tasks: Mapping[str, Collection[str]] | None) -> None:
    if not RECORD_ID.fullmatch(r.record_id):
        raise FieldError(f"{at}.record_id", f"{r.record_id!r} must be 1 to 128 printable ASCII characters, no spaces")
    check_request_id(f"{at}.request_id", r.request_id)
    check_name(f"{at}.task", r.task)
    if tasks is not None and r.task not in tasks:
        raise FieldError(f"{at}.task", f"unknown task {r.task!r}; the cloud has {sorted(tasks)}")
    if r.kind not in KINDS:
        raise FieldError(f"{at}.kind", f"must be one of {', '.join(KINDS.values())}")
    check_text(f"{at}.text", r.text)
    check_device_id(f"{at}.device_id", r.device_id)
    if r.kind in LABELLED_KINDS and not r.label:
        raise FieldError(f"{at}.label", f"required for {KINDS[r.kind]} records")
    if r.label and tasks is not None and r.label not in tasks[r.task]:
        raise FieldError(f"{at}.label", f"{r.label!r} is not a label of task {r.task}")
    if r.created_unix_ms <= 0:
        raise FieldError(f"{at}.created_unix_ms", "must be set, in milliseconds since the Unix epoch")


def to_table(records: Sequence[fleet_pb2.FeedbackRecord], stored_unix_ms: int) -> pa.Table:
    """The rows of one Parquet file (FILE_SCHEMA)."""
    return pa.Table.from_pylist([_row(r, stored_unix_ms) for r in records], schema=FILE_SCHEMA)


def _row(r: fleet_pb2.FeedbackRecord, stored_unix_ms: int) -> dict[str, object]:
    return {
        "record_id": r.record_id,
        "request_id": r.request_id,
        "kind": KINDS[r.kind],
        "text": r.text,
        "edge_label": r.edge.label,
        "edge_confidence": r.edge.confidence,
        "edge_model_version": r.edge.model_version,
        "label": r.label,
        "distribution": [{"label": d.label, "probability": d.probability} for d in r.distribution],
        "expert": r.expert,
        "device_id": r.device_id,
        "created_unix_ms": r.created_unix_ms,
        "stored_unix_ms": stored_unix_ms,
    }

