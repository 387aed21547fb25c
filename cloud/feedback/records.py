"""Feedback records as stored: the Arrow schema, the checks at the boundary, proto → rows."""

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence

import pyarrow as pa

from cloud.errors import InvalidFeedback
from tandem.v1 import cloud_pb2

# Printable ASCII without spaces: ids end up in logs and in joins across systems.
RECORD_ID = re.compile(r"[\x21-\x7e]{1,128}")
# A task becomes a partition directory (task=<name>).
TASK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KINDS = {cloud_pb2.FeedbackKind.Value(name): name for name in ("ESCALATION", "CORRECTION", "FALLBACK", "AUDIT")}
# Kinds whose `label` is the answer the record exists for.
LABELLED = {cloud_pb2.ESCALATION, cloud_pb2.CORRECTION}

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


def check(records: Sequence[cloud_pb2.FeedbackRecord], tasks: Mapping[str, Collection[str]] | None,
          max_text_bytes: int) -> None:
    """InvalidFeedback naming the first bad field; `tasks` (task -> labels), where given,
    limits tasks and labels to the cloud's own."""
    for i, record in enumerate(records):
        _check(record, f"records[{i}]", tasks, max_text_bytes)


def _check(r: cloud_pb2.FeedbackRecord, at: str, tasks: Mapping[str, Collection[str]] | None, max_text_bytes: int) -> None:
    if not RECORD_ID.fullmatch(r.record_id):
        raise InvalidFeedback(f"{at}.record_id", f"{r.record_id!r} must be 1 to 128 printable ASCII characters, no spaces")
    if not TASK.fullmatch(r.task):
        raise InvalidFeedback(f"{at}.task", f"invalid task name {r.task!r}: up to 64 letters, digits, '.', '_', '-'")
    if tasks is not None and r.task not in tasks:
        raise InvalidFeedback(f"{at}.task", f"unknown task {r.task!r}; the cloud has {sorted(tasks)}")
    if r.kind not in KINDS:
        raise InvalidFeedback(f"{at}.kind", f"must be one of {', '.join(KINDS.values())}")
    size = len(r.text.encode())
    if not r.text.strip():
        raise InvalidFeedback(f"{at}.text", "must not be empty or blank")
    if size > max_text_bytes:
        raise InvalidFeedback(f"{at}.text", f"{size} bytes exceeds the limit of {max_text_bytes} bytes")
    if r.kind in LABELLED and not r.label:
        raise InvalidFeedback(f"{at}.label", f"required for {KINDS[r.kind]} records")
    if r.label and tasks is not None and r.label not in tasks[r.task]:
        raise InvalidFeedback(f"{at}.label", f"{r.label!r} is not a label of task {r.task}")
    if r.created_unix_ms <= 0:
        raise InvalidFeedback(f"{at}.created_unix_ms", "must be set, in milliseconds since the Unix epoch")


def to_table(records: Sequence[cloud_pb2.FeedbackRecord], stored_unix_ms: int) -> pa.Table:
    """The rows of one Parquet file (FILE_SCHEMA)."""
    return pa.Table.from_pylist([_row(r, stored_unix_ms) for r in records], schema=FILE_SCHEMA)


def _row(r: cloud_pb2.FeedbackRecord, stored_unix_ms: int) -> dict[str, object]:
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


def escalation_record(request: cloud_pb2.EscalateRequest, response: cloud_pb2.EscalateResponse,
                      answered_unix_ms: int) -> cloud_pb2.FeedbackRecord:
    """What the cloud keeps of an escalation it answered. Its id hashes the device and request
    ids: an escalation recorded twice is stored once, while two devices that both number their
    requests 1, 2, ... do not collide, and any request id makes a valid record id."""
    key = hashlib.sha256(f"{request.device_id}\0{request.request_id}".encode()).hexdigest()[:32]
    return cloud_pb2.FeedbackRecord(
        record_id=f"esc-{key}",
        request_id=request.request_id,
        task=request.task,
        kind=cloud_pb2.ESCALATION,
        text=request.text,
        edge=request.edge,
        label=response.label,
        distribution=response.distribution,
        expert=response.expert,
        device_id=request.device_id,
        created_unix_ms=answered_unix_ms,
    )
