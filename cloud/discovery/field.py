"""The feedback store as discovery reads and writes it: the out-of-scope texts of a task, and
the examples an operator labels by naming a cluster.

A text is out of scope when the answer recorded with it was the task's out-of-scope label: the
expert's (ESCALATION), the edge's (FALLBACK, AUDIT) or a user's (CORRECTION). Named examples are
CORRECTION records from the device OPERATOR, which no device can be (device ids are
`contract.NAME`s, which start with a letter or digit): the retrainer and the expert trainer read
them where they read every field label, and a device cannot pass its claims off as an operator's.
"""

import hashlib
import time
from collections import defaultdict
from collections.abc import Sequence

from cloud.discovery.clusters import Cluster, DiscoveryConfig, FieldText, find_clusters
from cloud.feedback import FeedbackStore
from cloud.feedback.records import LabelSet, check
from tandem.tasks import Task
from tandem.v1 import fleet_pb2

OPERATOR = "@operator"
EDGE_ANSWERED = frozenset({"FALLBACK", "AUDIT"})
COLUMNS = ["kind", "text", "label", "edge_label", "device_id"]


def normalised(text: str) -> str:
    """Case and spacing do not make another text (as the retrainer's corroboration counts them)."""
    return " ".join(text.casefold().split())


def out_of_scope_texts(uri: str, task: Task) -> list[FieldText]:
    """The task's distinct out-of-scope texts, oldest first, each with the devices that sent it
    (records without an authenticated device count none), less the texts an operator has labelled."""
    rows = FeedbackStore(uri).read(task.name).sort_by("created_unix_ms").select(COLUMNS).to_pylist()
    labelled = {normalised(r["text"]) for r in rows if r["device_id"] == OPERATOR}
    first: dict[str, str] = {}
    devices: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        answer = r["edge_label"] if r["kind"] in EDGE_ANSWERED else r["label"]
        key = normalised(r["text"] or "")
        if answer != task.oos_label or not key or key in labelled:
            continue
        first.setdefault(key, r["text"])
        if r["device_id"]:
            devices[key].add(r["device_id"])
    return [FieldText(text, frozenset(devices[key])) for key, text in first.items()]


def store_named(uri: str, task: Task, label: str, texts: Sequence[str]) -> int:
    """Stores `texts` as `label` examples from OPERATOR (checked against `task`'s label set, which
    must hold `label`); returns how many were new (naming the same texts again stores nothing)."""
    now_ms = int(time.time() * 1000)
    records = [fleet_pb2.FeedbackRecord(
        record_id=f"op/{_digest(label, text)}", request_id=f"intents-name-{now_ms}", task=task.name,
        kind=fleet_pb2.CORRECTION, text=text, label=label, device_id=OPERATOR, created_unix_ms=now_ms,
        label_set_version=task.label_set_version,
    ) for text in texts]
    check(records, {task.name: LabelSet(frozenset(task.label_names()), task.label_set_version)})
    return len(FeedbackStore(uri).add(records))


def _digest(label: str, text: str) -> str:
    return hashlib.sha256(f"{label}\0{normalised(text)}".encode()).hexdigest()[:40]


def task_clusters(uri: str, task: Task, cfg: DiscoveryConfig, min_devices: int) -> list[Cluster]:
    """The clusters of the task's out-of-scope texts an operator is shown (`clusters.find_clusters`),
    embedded with the generate expert's retrieval embedder (all-MiniLM-L6-v2)."""
    from cloud.experts.retrieval import MiniLMEmbedder

    return find_clusters(out_of_scope_texts(uri, task), MiniLMEmbedder(), cfg, min_devices)
