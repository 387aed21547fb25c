"""`tandem bench open-intent`: queries that fit no intent, by the open-intent protocol.

For each share of known intents (25%, 50%, 75%: a seeded choice of the task's intents), the
teacher and the student are trained on the known intents only, their out-of-scope boundary
fitted on held-out known texts, and the whole test split is answered, the unknown intents'
texts counting as out of scope (Zhang et al., AAAI 2021, "ADB", and the work it compares).
- expert: the teacher, served by vLLM's pooling runner through the classify expert's runner;
- student: the int8 artifact through the edge's own `Student`;
- cascade: the student where its confidence reaches the edge's threshold, else the expert.
Each is also scored closed-set (the same model, no boundary) on the known intents' texts.
"""

import asyncio
import csv
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cloud.training.config import FitConfig, TrainConfig
from tandem import envs
from tandem.settings import TandemSettings
from tandem.tasks import Example, Task, TaskFile, banking77

log = logging.getLogger(__name__)


class OpenIntentConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_OPEN_")

    task: TaskFile = Field(default_factory=banking77, description="The task whose intents are split into known and open.")
    known_ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75],
                                      description="Shares of the intents known at training.")
    seed: int = Field(0, description="Seeds the choice of known intents and the training.")
    teacher: FitConfig = FitConfig()
    student: FitConfig = FitConfig(layers=2, lr=3e-4)
    known_rejection: float = Field(0.05, ge=0, lt=0.5, description="The boundaries' fit (TrainConfig.known_rejection).")
    threshold: float | None = Field(
        None, gt=0, le=1, description="The cascade's confidence threshold; default: each student's fitted one (its "
        "manifest's operating point), which the shipped edge config adopts."
    )
    sweep_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9],
                                          description="Cascade thresholds also reported.")
    max_examples: int | None = Field(None, ge=1, description="Train on at most this many texts (quick runs).")


def run_open_intent(cfg: OpenIntentConfig, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"task": cfg.task.name, "seed": cfg.seed, "known_rejection": cfg.known_rejection,
                              "known_ratios": {}}
    for ratio in cfg.known_ratios:
        log.info("open intent: %g of the intents known", ratio)
        result["known_ratios"][f"{ratio:g}"] = _ratio(cfg, ratio)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def known_intents(task: Task, ratio: float, seed: int) -> list[str]:
    """A seeded choice of `ratio` of the task's intents (at least one), in label-set order."""
    intents = [name for name in task.label_names() if name != task.oos_label]
    chosen = set(random.Random(seed).sample(intents, max(1, round(ratio * len(intents)))))
    return [name for name in intents if name in chosen]


def open_metrics(truth: list[str], predicted: list[str], known: list[str], oos: str) -> dict[str, float]:
    """Accuracy and macro-F1 over the known intents and the open class, the open class's
    recall, and the accuracy on known intents' texts (an out-of-scope answer counting as wrong)."""
    t, p = np.array(truth), np.array(predicted)
    f1 = []
    for label in [*known, oos]:
        tp = float(np.sum((t == label) & (p == label)))
        fp, fn = float(np.sum((t != label) & (p == label))), float(np.sum((t == label) & (p != label)))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    is_open = t == oos
    return {
        "accuracy": float(np.mean(t == p)),
        "macro_f1": float(np.mean(f1)),
        "open_recall": float(np.mean(p[is_open] == oos)) if is_open.any() else float("nan"),
        "known_accuracy": float(np.mean(p[~is_open] == t[~is_open])),
    }


def _ratio(cfg: OpenIntentConfig, ratio: float) -> dict[str, Any]:
    task = cfg.task
    known = known_intents(task, ratio, cfg.seed)
    train_cfg = _train_config(cfg, _open_task(task, known, ratio, cfg.seed))
    teacher_dir, student_dir = _trained(train_cfg)
    test = task.load("test")
    truth = [e.label if e.label in known else task.oos_label for e in test]
    texts = [e.text for e in test]
    expert = asyncio.run(_expert_answers(teacher_dir, texts, train_cfg.task))
    student_probs, student_labels, threshold = _student_probs(student_dir, texts)
    threshold = cfg.threshold or threshold
    oos = task.oos_label
    student = [student_labels[i] for i in student_probs.argmax(-1)]
    is_known = np.array([t != oos for t in truth])
    closed_expert = [next(label for label, _ in e if label != oos) for e in expert]
    entry = {
        "known_intents": len(known),
        "threshold": threshold,
        "test_known": int(is_known.sum()),
        "test_open": int((~is_known).sum()),
        "expert": open_metrics(truth, [e[0][0] for e in expert], known, oos),
        "student": open_metrics(truth, student, known, oos),
        "cascade": _cascade_point(truth, known, oos, expert, student, student_probs, threshold),
        "closed_set_known_accuracy": _known_accuracy(truth, closed_expert, is_known),
        "closed_set": _closed_set(truth, is_known, closed_expert, student_probs, student_labels, oos, threshold),
        "cascade_sweep": [_cascade_point(truth, known, oos, expert, student, student_probs, t) for t in cfg.sweep_thresholds],
    }
    log.info("known %g: expert F1 %.2f open recall %.1f%% | student F1 %.2f | cascade F1 %.2f, %.1f%% escalated, open "
             "recall %.1f%%, known acc %.1f%% (closed-set %.1f%%)", ratio, 100 * entry["expert"]["macro_f1"],
             100 * entry["expert"]["open_recall"], 100 * entry["student"]["macro_f1"], 100 * entry["cascade"]["macro_f1"],
             100 * entry["cascade"]["escalation_rate"], 100 * entry["cascade"]["open_recall"],
             100 * entry["cascade"]["known_accuracy"], 100 * entry["closed_set_known_accuracy"])
    return entry


def _cascade_point(truth: list[str], known: list[str], oos: str, expert: list[list[tuple[str, float]]],
                   student: list[str], probs: np.ndarray, threshold: float) -> dict[str, float]:
    """The student's answer where its confidence reaches `threshold`, else the expert's."""
    escalate = probs.max(-1) < threshold
    cascade = [e[0][0] if up else s for e, s, up in zip(expert, student, escalate)]
    return {**open_metrics(truth, cascade, known, oos), "escalation_rate": float(escalate.mean()), "threshold": threshold}


def _closed_set(truth: list[str], is_known: np.ndarray, closed_expert: list[str], probs: np.ndarray,
                labels: list[str], oos: str, threshold: float) -> dict[str, float]:
    """Known-intent accuracy of the same models without their boundary: the student's probabilities
    renormalised over its intents (the softmax of its own logits), the cascade at the same threshold."""
    intents = [i for i, label in enumerate(labels) if label != oos]
    closed = probs[:, intents] / probs[:, intents].sum(-1, keepdims=True)
    student = [labels[intents[i]] for i in closed.argmax(-1)]
    escalate = closed.max(-1) < threshold
    cascade = [e if up else s for e, s, up in zip(closed_expert, student, escalate)]
    return {"expert": _known_accuracy(truth, closed_expert, is_known), "student": _known_accuracy(truth, student, is_known),
            "cascade": _known_accuracy(truth, cascade, is_known), "cascade_escalation_rate": float(escalate.mean())}


def _known_accuracy(truth: list[str], predicted: list[str], is_known: np.ndarray) -> float:
    return float(np.mean([p == t for p, t, k in zip(predicted, truth, is_known) if k]))


def _open_task(task: Task, known: list[str], ratio: float, seed: int) -> Task:
    """The task restricted to `known` intents: train and test keep only their texts; its
    out-of-scope label is the original task's."""
    folder = envs.TANDEM_CACHE_DIR / "open-intent" / f"{task.name}-known{ratio:g}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    keep = set(known)
    for split in ("train", "test"):
        _write_csv(folder / f"{split}.csv", [e for e in task.load(split) if e.label in keep])
    spec = {"name": f"{task.name}-known{int(round(100 * ratio))}", "label_set_version": task.label_set_version,
            "train": str(folder / "train.csv"), "test": str(folder / "test.csv"),
            "labels": {name: task.descriptions()[name] for name in known}, "out_of_scope": task.oos_label}
    (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return Task.from_file(folder / "task.yaml")


def _write_csv(path: Path, examples: list[Example]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((e.text, e.label) for e in examples)


def _train_config(cfg: OpenIntentConfig, task: Task) -> TrainConfig:
    """Models cached by everything that trains them: a rerun with the same settings reuses them."""
    fits = json.dumps([task.model_dump(mode="json"), cfg.teacher.model_dump(), cfg.student.model_dump(),
                       cfg.known_rejection, cfg.seed, cfg.max_examples], sort_keys=True)
    root = envs.TANDEM_CACHE_DIR / "open-intent" / "models" / hashlib.sha256(fits.encode()).hexdigest()[:16]
    capped = {"max_examples": cfg.max_examples}
    return TrainConfig(task=task, output_dir=root, seed=cfg.seed, known_rejection=cfg.known_rejection,
                       teacher=cfg.teacher.model_copy(update=capped), student=cfg.student.model_copy(update=capped),
                       signing_key=envs.TANDEM_CACHE_DIR / "open-intent" / "bench-signing.pem", dev_keys=True)


def _trained(cfg: TrainConfig) -> tuple[Path, Path]:
    from cloud.training.student import train_student
    from cloud.training.teacher import train_teacher

    dirs = cfg.model_dir("teacher"), cfg.model_dir("student")
    for kind, train, directory in (("teacher", train_teacher, dirs[0]), ("student", train_student, dirs[1])):
        if (directory / "manifest.json").exists():
            log.info("%s for %s: cached in %s", kind, cfg.task.name, directory)
        else:
            log.info("training the %s for %s", kind, cfg.task.name)
            train(cfg, directory)
    return dirs


async def _expert_answers(teacher_dir: Path, texts: list[str], task: Task) -> list[list[tuple[str, float]]]:
    """Each text's distribution from the classify expert's runner on a vLLM engine in this process."""
    from cloud.config import ExpertConfig
    from cloud.experts.classify import ClassifyRunner
    from cloud.experts.engine import local_engine

    expert = ExpertConfig(name="open-intent-expert", kind="classify", model=str(teacher_dir), dtype="float32",
                          max_model_len=128)
    with local_engine(expert) as engine:
        runner = ClassifyRunner(engine, expert, {task.name: task})
        answers = await asyncio.gather(*(runner.answer(t, task.name, f"open-{i}") for i, t in enumerate(texts)))
    return [a.distribution for a in answers]


def _student_probs(student_dir: Path, texts: list[str]) -> tuple[np.ndarray, list[str], float]:
    """The student's probabilities, its labels and its fitted threshold."""
    from edge.student import Student

    student = Student.load(student_dir)
    point = student.manifest.operating_point
    if point is None:
        raise ValueError(f"student {student_dir} carries no fitted threshold: retrain it, or set threshold")
    return student.predict(texts), student.labels, point.threshold


def format_table(result: dict[str, Any]) -> str:
    rows = ["| known | model | accuracy | macro-F1 | open recall | known acc. | escalated |", "|---|---|---|---|---|---|---|"]
    for ratio, entry in result["known_ratios"].items():
        for model in ("expert", "student", "cascade"):
            m = entry[model]
            escalated = f"{100 * m['escalation_rate']:.1f}%" if "escalation_rate" in m else ""
            rows.append(f"| {float(ratio):.0%} | {model} | {100 * m['accuracy']:.2f} | {100 * m['macro_f1']:.2f} | "
                        f"{100 * m['open_recall']:.1f}% | {100 * m['known_accuracy']:.2f} | {escalated} |")
        rows.append(f"| {float(ratio):.0%} | closed-set expert | | | | {100 * entry['closed_set_known_accuracy']:.2f} | |")
    return "\n".join(rows)
