"""Feedback records as stored: the Arrow schema, the checks at the Fleet boundary, proto → rows."""

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

import pyarrow as pa

from cloud.errors import InvalidFeedback
from tandem.contract import (LABELLED_KINDS, RECORD_ID, FieldError, check_device_id, check_name, check_request_id,
                             check_text)
from tandem.v1 import common_pb2, fleet_pb2

KINDS = {fleet_pb2.FeedbackKind.Value(name): name for name in ("ESCALATION", "CORRECTION", "FALLBACK", "AUDIT")}
# Most a distribution's probabilities may sum to: experts may send only their top k, so less
# than 1 is fine, and float32 rounding may lift a whole distribution a little above it.
DISTRIBUTION_MASS_MAX = 1 + 1e-3
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


class LabelSet(NamedTuple):
    """A task's labels as the cloud knows them, and their version (`Task.label_set_version`)."""

    labels: frozenset[str]
    version: int


def check(records: Sequence[fleet_pb2.FeedbackRecord], tasks: Mapping[str, LabelSet] | None) -> None:
    """InvalidFeedback naming the first bad field; `tasks` (task -> its label set), where given,
    limits tasks and labels to the cloud's own. A label the cloud does not know is refused on
    the field `label` (which edges keep and retry: the cloud is behind) if the record's label
    set is newer than the cloud's, else on `label_set_version` (which edges set aside)."""
    for i, record in enumerate(records):
        try:
            _check(record, f"records[{i}]", tasks)
        except FieldError as exc:
            raise InvalidFeedback.of(exc) from None


def _check(r: fleet_pb2.FeedbackRecord, at: str, tasks: Mapping[str, LabelSet] | None) -> None:
    if not RECORD_ID.fullmatch(r.record_id):
        # A long one is not echoed back: the status message travels in gRPC trailers, which clients cap at a few KiB.
        shown = repr(r.record_id) if len(r.record_id) <= 128 else f"{len(r.record_id)} characters:"
        raise FieldError(f"{at}.record_id", f"{shown} must be 1 to 128 printable ASCII characters, no spaces")
    check_request_id(f"{at}.request_id", r.request_id)
    check_name(f"{at}.task", r.task)
    if tasks is not None and r.task not in tasks:
        raise FieldError(f"{at}.task", f"unknown task {r.task!r}; the cloud has {sorted(tasks)}")
    if r.kind not in KINDS:
        raise FieldError(f"{at}.kind", f"must be one of {', '.join(KINDS.values())}")
    check_text(f"{at}.text", r.text)
    check_device_id(f"{at}.device_id", r.device_id)
    labels = None if tasks is None else tasks[r.task]
    if r.kind in LABELLED_KINDS and not r.label:
        raise FieldError(f"{at}.label", f"required for {KINDS[r.kind]} records")
    try:
        if r.label:
            _check_label(f"{at}.label", r.label, r.task, labels and labels.labels)
        check_edge(f"{at}.edge", r.edge, r.task, labels and labels.labels)
        check_distribution(f"{at}.distribution", r.distribution, r.task, labels and labels.labels)
    except UnknownLabel as exc:
        assert labels is not None  # only a known label set refuses a label
        if r.label_set_version > labels.version:
            raise FieldError(exc.field, f"{exc.problem}: version {labels.version} of its label set; the record's "
                                        f"version {r.label_set_version} is newer (retry once the cloud has it)") from None
        raise FieldError(f"{at}.label_set_version", f"{r.label_set_version} is not newer than the cloud's version "
                                                    f"{labels.version} of task {r.task}'s label set, which lacks "
                                                    f"{exc.field}: {exc.problem}") from None
    if r.created_unix_ms <= 0:
        raise FieldError(f"{at}.created_unix_ms", "must be set, in milliseconds since the Unix epoch")


def check_edge(at: str, edge: common_pb2.EdgePrediction, task: str, labels: Collection[str] | None) -> None:
    """FieldError unless the edge's prediction (where it sent one) names a label of `task`
    (`labels`, where known), a confidence in [0, 1] and a valid model version."""
    if edge.label:
        _check_label(f"{at}.label", edge.label, task, labels)
    if not 0.0 <= edge.confidence <= 1.0:  # NaN fails too
        raise FieldError(f"{at}.confidence", f"{edge.confidence} is not in [0, 1]")
    if edge.model_version:
        check_name(f"{at}.model_version", edge.model_version)


def check_distribution(at: str, scores: Sequence[common_pb2.LabelScore], task: str, labels: Collection[str] | None) -> None:
    """FieldError unless `scores` name distinct labels of `task` (`labels`, where known), at most
    one per label, with probabilities in [0, 1] summing to at most DISTRIBUTION_MASS_MAX."""
    if labels is not None and len(scores) > len(labels):
        raise FieldError(at, f"{len(scores)} entries exceed the {len(labels)} labels of task {task}")
    seen: set[str] = set()
    total = 0.0
    for i, score in enumerate(scores):
        _check_label(f"{at}[{i}].label", score.label, task, labels)
        if score.label in seen:
            raise FieldError(f"{at}[{i}].label", f"{score.label!r} appears twice")
        seen.add(score.label)
        if not 0.0 <= score.probability <= 1.0:  # NaN fails too
            raise FieldError(f"{at}[{i}].probability", f"{score.probability} is not in [0, 1]")
        total += score.probability
    if total > DISTRIBUTION_MASS_MAX:
        raise FieldError(at, f"probabilities sum to {total:.6g}, above the limit of {DISTRIBUTION_MASS_MAX}")


class UnknownLabel(FieldError):
    """A label the cloud's label set of the task lacks."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(field, problem)
        self.problem = problem


def _check_label(field: str, label: str, task: str, labels: Collection[str] | None) -> None:
    if labels is not None and label not in labels:
        raise UnknownLabel(field, f"{label[:64]!r} is not a label of task {task}")


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

