"""The training set of a distillation round: a labelled seed of the task's data plus feedback.

Hard labels come from the dataset, a user's CORRECTION or the expert's ESCALATION answer;
FALLBACK and AUDIT records (the edge's own answers) get none and learn from the teacher's soft
labels alone: taking the teacher's argmax as a hard label would count the teacher twice and
push its mistakes in with full confidence.
"""

import logging
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cloud.feedback import FeedbackStore
from cloud.training.data import Split, Splits, tokenizer
from cloud.training.loop import encode
from tandem.contract import LABELLED_KINDS
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)

NO_LABEL = -1
# contract.LABELLED_KINDS by name: the feedback store holds kinds as their names.
LABELLED_KIND_NAMES = frozenset(fleet_pb2.FeedbackKind.Name(k) for k in LABELLED_KINDS)


@dataclass(frozen=True)
class FeedbackExample:
    kind: str  # ESCALATION, CORRECTION, FALLBACK or AUDIT
    text: str  # redacted on the device
    label: str  # the correct label where known (see LABELLED_KIND_NAMES), else ""


@dataclass(frozen=True)
class DistillSet:
    ids: list[list[int]]
    labels: np.ndarray  # label index per example; NO_LABEL: the teacher's soft label only
    labelled: int  # examples from the task's labelled seed (the first ones)
    feedback: dict[str, int]  # feedback examples used, by kind
    dropped: int  # feedback records left out: empty, or a held-out text


def read_feedback(uri: str, task: str) -> list[FeedbackExample]:
    """The task's feedback records in the store (deduplicated by record id), once the store
    has compacted the task's partitions: each retraining round leaves one file per day."""
    store = FeedbackStore(uri)
    try:
        store.compact(task)
    except OSError:  # e.g. no delete rights: the round reads the uncompacted files
        log.exception("compacting %s's feedback failed; reading it as it is", task)
    rows = store.read(task).select(["kind", "text", "label"]).to_pylist()
    return [FeedbackExample(r["kind"], r["text"], r["label"] or "") for r in rows]


def labelled_seed(train: Split, fraction: float) -> Split:
    """The first `fraction` of the (already shuffled) train split."""
    n = math.ceil(len(train.ids) * fraction)
    return Split(train.ids[:n], train.labels[:n])


def build_distill_set(
    splits: Splits, feedback: list[FeedbackExample], seed_fraction: float, max_length: int
) -> DistillSet:
    """The seed plus every usable feedback record. Records whose text is in the validation or
    test split are dropped: those splits decide the gate and the reported accuracy."""
    seed = labelled_seed(splits.train, seed_fraction)
    held_out = {tuple(x) for x in splits.val.ids + splits.test.ids}
    index = {name: i for i, name in enumerate(splits.label_names)}
    rows = [f for f in feedback if f.text.strip()]
    ids = encode(tokenizer(), [f.text for f in rows], max_length)
    kept = [(f, x) for f, x in zip(rows, ids) if tuple(x) not in held_out]
    labels = [index.get(f.label, NO_LABEL) if f.kind in LABELLED_KIND_NAMES else NO_LABEL for f, _ in kept]
    return DistillSet(
        ids=seed.ids + [x for _, x in kept],
        labels=np.concatenate([seed.labels, np.array(labels, dtype=np.int64)]),
        labelled=len(seed.ids),
        feedback=dict(Counter(f.kind for f, _ in kept)),
        dropped=len(feedback) - len(kept),
    )
