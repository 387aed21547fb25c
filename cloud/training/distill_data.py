"""The training set of a distillation round: a labelled seed of the task's data plus feedback.

Hard labels come from the dataset, the expert's ESCALATION answer, or a user's CORRECTION once
it is corroborated; FALLBACK and AUDIT records (the edge's own answers) get none and learn from
the teacher's soft labels alone: taking the teacher's argmax as a hard label would count the
teacher twice and push its mistakes in with full confidence.

A correction is whatever a device says, so one device could teach the student anything (a
trigger phrase mapped to a wrong label, say). Its label trains as a hard label only when it is
corroborated: `corroboration_devices` distinct devices sent the same label for the same text, or
the teacher's argmax agrees (`corroborate`). Otherwise the text trains from the teacher's soft
labels only, which is what the teacher thinks of it, not what the device claims.
"""

import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from cloud.feedback import FeedbackStore
from cloud.feedback.store import READ_ERRORS
from cloud.training.data import Split, Splits, tokenizer
from cloud.training.loop import encode
from cloud.training.soft_labels import NO_LABEL
from tandem.contract import LABELLED_KINDS
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)

# contract.LABELLED_KINDS by name: the feedback store holds kinds as their names.
LABELLED_KIND_NAMES = frozenset(fleet_pb2.FeedbackKind.Name(k) for k in LABELLED_KINDS)
CORRECTION = fleet_pb2.FeedbackKind.Name(fleet_pb2.CORRECTION)


@dataclass(frozen=True)
class FeedbackExample:
    kind: str  # ESCALATION, CORRECTION, FALLBACK or AUDIT
    text: str  # redacted on the device
    label: str  # the correct label where known (see LABELLED_KIND_NAMES), else ""
    device_id: str = ""  # the authenticated device that sent it (for ESCALATION: that asked)
    date: str = ""  # the store partition (UTC day, ISO) it was read from; "" if not from the store


@dataclass(frozen=True)
class DistillSet:
    ids: list[list[int]]  # the student's tokens
    texts: list[str]  # what `ids` encode, for the teacher's tokenizer
    labels: np.ndarray  # label index per example; NO_LABEL: the teacher's soft label only
    labelled: int  # examples from the task's labelled seed (the first ones)
    feedback: dict[str, int]  # feedback examples used, by kind
    dropped: int  # feedback records left out: empty, or a held-out text
    # Rows of corrections that too few devices corroborated -> their claimed label index; their
    # `labels` stay NO_LABEL until `corroborate` finds the teacher agrees.
    claims: dict[int, int] = field(default_factory=dict)
    # Corrections: corroborated_by_devices, corroborated_by_teacher, soft_only.
    corrections: dict[str, int] = field(default_factory=dict)


def read_feedback(uri: str, task: str) -> list[FeedbackExample]:
    """The task's feedback records in the store (deduplicated by record id), once the store
    has compacted the task's partitions: each retraining round leaves one file per day."""
    store = FeedbackStore(uri)
    try:
        store.compact(task)
    except READ_ERRORS:  # e.g. no delete rights, or a file it cannot read: the round reads what it can
        log.exception("compacting %s's feedback failed; reading it as it is", task)
    rows = store.read(task).select(["kind", "text", "label", "device_id", "date"]).to_pylist()
    return [
        FeedbackExample(r["kind"], r["text"], r["label"] or "", r["device_id"] or "", r["date"].isoformat())
        for r in rows
    ]


def labelled_seed(train: Split, fraction: float) -> Split:
    """The first `fraction` of the (already shuffled) train split."""
    n = math.ceil(len(train.ids) * fraction)
    return Split(train.ids[:n], train.labels[:n], train.texts[:n])


def build_distill_set(
    splits: Splits, feedback: list[FeedbackExample], seed_fraction: float, max_length: int,
    corroboration_devices: int,
) -> DistillSet:
    """The seed plus every usable feedback record. Records whose text is in the validation or
    test split are dropped: those splits decide the gate and the reported accuracy. A
    correction's label is hard only if `corroboration_devices` devices sent it for its text;
    the others wait in `claims` for `corroborate`."""
    seed = labelled_seed(splits.train, seed_fraction)
    held_out = {tuple(x) for x in splits.val.ids + splits.calib.ids + splits.test.ids}
    index = {name: i for i, name in enumerate(splits.label_names)}
    rows = [f for f in feedback if f.text.strip()]
    ids = encode(tokenizer(splits.base_model), [f.text for f in rows], max_length)
    kept = [(f, x) for f, x in zip(rows, ids) if tuple(x) not in held_out]
    devices = _devices_per_claim([f for f, _ in kept])
    labels, claims, by_devices = [], {}, 0
    for row, (f, _) in enumerate(kept, start=len(seed.ids)):
        label = index.get(f.label, NO_LABEL) if f.kind in LABELLED_KIND_NAMES else NO_LABEL
        if f.kind == CORRECTION and label != NO_LABEL:
            if len(devices[_claim(f)]) >= corroboration_devices:
                by_devices += 1
            else:
                claims[row], label = label, NO_LABEL
        labels.append(label)
    return DistillSet(
        ids=seed.ids + [x for _, x in kept],
        texts=seed.texts + [f.text for f, _ in kept],
        labels=np.concatenate([seed.labels, np.array(labels, dtype=np.int64)]),
        labelled=len(seed.ids),
        feedback=dict(Counter(f.kind for f, _ in kept)),
        dropped=len(feedback) - len(kept),
        claims=claims,
        corrections={"corroborated_by_devices": by_devices},
    )


def corroborate(data: DistillSet, teacher: np.ndarray) -> DistillSet:
    """`data` with each waiting correction's label made hard where the teacher's argmax (one row
    of logits per example) agrees; the rest train from the teacher's soft labels only."""
    agreed = {row: label for row, label in data.claims.items() if int(teacher[row].argmax()) == label}
    labels = data.labels.copy()
    labels[list(agreed)] = list(agreed.values())
    counts = {"corroborated_by_teacher": len(agreed), "soft_only": len(data.claims) - len(agreed)}
    if data.claims:
        log.info("corrections: %d corroborated by devices, %d by the teacher, %d train from soft labels only",
                 data.corrections["corroborated_by_devices"], counts["corroborated_by_teacher"], counts["soft_only"])
    return replace(data, labels=labels, claims={}, corrections={**data.corrections, **counts})


def _devices_per_claim(feedback: list[FeedbackExample]) -> dict[tuple[str, str], set[str]]:
    """The distinct devices that sent each (normalised text, label) correction. Records without
    a device id (none from an authenticated device) corroborate nothing."""
    devices: dict[tuple[str, str], set[str]] = defaultdict(set)
    for f in feedback:
        if f.kind == CORRECTION and f.device_id:
            devices[_claim(f)].add(f.device_id)
    return devices


def _claim(f: FeedbackExample) -> tuple[str, str]:
    # Case and spacing do not make a different text: one device must not corroborate itself.
    return " ".join(f.text.casefold().split()), f.label
