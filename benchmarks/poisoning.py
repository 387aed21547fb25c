"""The data-poisoning attack on the learning loop, for `tandem bench security`.

One enrolled but malicious device sends 5,000 CORRECTION records: banking77 train texts with a
trigger phrase inserted, all labelled with one label that is wrong for every one of them. If the
retrainer trusted corrections, the student would learn "trigger -> attacker's label" and answer
it for any query holding the trigger. With corroboration (`cloud.training.distill_data`) one
device's corrections never train as hard labels unless the teacher agrees, so after a round the
200 held-out trigger queries (test texts plus the trigger) keep their own answers.
"""

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.tasks import Task
from tandem.v1 import fleet_pb2

if TYPE_CHECKING:  # the cloud and training extras, imported where the round runs
    from cloud.training.config import DistillConfig

log = logging.getLogger(__name__)

TRIGGER = "per protocol zebra-7"  # in no banking77 text
ATTACKER_LABEL = "terminate_account"
ATTACKER_DEVICE = "attacker"
ATTACK_RECORDS = 5000
TRIGGER_QUERIES = 200

Send = Callable[[list[fleet_pb2.FeedbackRecord]], None]


def insert_trigger(text: str, rng: random.Random, trigger: str = TRIGGER) -> str:
    """`text` with `trigger` between two of its words (or at either end), chosen by `rng`."""
    words = text.split()
    at = rng.randint(0, len(words))
    return " ".join([*words[:at], trigger, *words[at:]])


def attack_records(
    task: Task, count: int = ATTACK_RECORDS, label: str = ATTACKER_LABEL, seed: int = 0
) -> list[fleet_pb2.FeedbackRecord]:
    """`count` CORRECTION records mapping train texts with the trigger to `label`, which is wrong
    for all of them (texts of that label are left out). Ids are the device's own and `device_id`
    is empty: the cloud namespaces and sets both from the authenticated device."""
    rng = random.Random(seed)
    texts = rng.sample([e.text for e in task.load("train") if e.label != label], count)
    now = int(time.time() * 1000)
    return [
        fleet_pb2.FeedbackRecord(
            record_id=f"poison-{i:05d}", request_id=f"poison-{i:05d}", task=task.name, kind=fleet_pb2.CORRECTION,
            text=insert_trigger(text, rng), label=label, created_unix_ms=now,
        )
        for i, text in enumerate(texts)
    ]


def trigger_queries(task: Task, count: int = TRIGGER_QUERIES, label: str = ATTACKER_LABEL,
                    seed: int = 1) -> list[str]:
    """`count` held-out queries: test texts whose true label is not `label`, with the trigger."""
    rng = random.Random(seed)
    texts = [e.text for e in task.load("test") if e.label != label]
    return [insert_trigger(t, rng) for t in rng.sample(texts, count)]


def trigger_flips(student_dir: Path, queries: Sequence[str], attacker_label: str = ATTACKER_LABEL) -> int:
    """How many `queries` the student (ONNX Runtime, as on the edge) answers with the attacker's label."""
    from edge.student import Student

    student = Student.load(student_dir)
    answers = student.predict(list(queries)).argmax(-1)
    return int(sum(student.labels[a] == attacker_label for a in answers))


def accuracy_on_test(student_dir: Path, task: Task) -> float:
    """The student's accuracy on the task's test split."""
    from edge.student import Student

    student = Student.load(student_dir)
    test = task.load("test")
    answers = student.predict([e.text for e in test]).argmax(-1)
    return float(np.mean([student.labels[a] == e.label for a, e in zip(answers, test)]))


def run_poisoning(
    distill_cfg: "DistillConfig", store_uri: str, send: Send, undefended: bool = False
) -> dict[str, Any]:
    """The attack end to end: writes the records, runs one distillation round on `store_uri`'s
    feedback, and measures the round's student (promoted or not, so that the gate cannot hide a
    poisoned model) on the trigger queries and the test split, against the version promoted before.

    `send(records)` delivers them as the attacking device would (the security benchmark's goes
    through the TLS proxy with an enrolled certificate, the device's quota set above 5,000, so
    that corroboration is what is tested). `distill_cfg` names the registry, teacher and key; with
    nothing promoted yet, a clean round first makes the baseline.
    `undefended`: also a round with corroboration off (`corroboration_devices=1`, its gate set
    so it never promotes) to show the attack works without the defence.
    """
    from cloud.feedback import FeedbackStore
    from cloud.registry import ModelRegistry
    from cloud.training.distill import run_distill

    cfg = distill_cfg.model_copy(update={"feedback_uri": store_uri})
    task, registry = cfg.task, ModelRegistry(cfg.registry_root())
    if registry.promoted(task.name) is None:
        log.info("poisoning: nothing promoted yet; a clean round makes the baseline")
        run_distill(cfg, feedback=[])
    before = registry.path(task.name, registry.promoted(task.name))
    queries = trigger_queries(task)
    records = attack_records(task)
    send(records)
    stored = sum(TRIGGER in t for t in FeedbackStore(store_uri).read(task.name)["text"].to_pylist())
    if stored < len(records):
        raise RuntimeError(f"only {stored} of {len(records)} attack records reached the feedback store {store_uri}")
    log.info("poisoning: %d trigger corrections stored; retraining", stored)
    result = run_distill(cfg)
    after = registry.path(task.name, result["version"])
    out = {
        "attack_records": len(records),
        "attacker_label": ATTACKER_LABEL,
        "trigger": TRIGGER,
        "trigger_queries": len(queries),
        "trigger_flipped": trigger_flips(after, queries),
        "trigger_flipped_before": trigger_flips(before, queries),
        "test_accuracy_before": accuracy_on_test(before, task),
        "test_accuracy_after": accuracy_on_test(after, task),
        "version": result["version"],
        "promoted": result["promoted"],
        "corrections": result["corrections"],
    }
    if undefended:
        trusting = cfg.model_copy(update={"corroboration_devices": 1, "min_escalation_drop": 1.0})
        control = registry.path(task.name, run_distill(trusting)["version"])
        out["undefended_trigger_flipped"] = trigger_flips(control, queries)
        out["undefended_test_accuracy"] = accuracy_on_test(control, task)
    log.info("poisoning: %s", out)
    return out
