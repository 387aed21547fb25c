"""`tandem bench student`: students side by side with their teacher, in one run.

Each configured student is trained (or reused from the cache, keyed by everything that trains
it and by the teacher's version) with `tandem train student`'s own code, then measured as the
edge runs it (`edge.student.Student`: its tokenizer, one ONNX Runtime run per text, 1 thread):
parameters, test accuracy, accuracy on the test queries holding a wordpiece that no train text
uses (what a pruned vocabulary never saw), int8 size and single-query latency.
"""

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.latency import LatencyRecorder
from cloud.training.config import COMPACT_STUDENT, FitConfig, TrainConfig
from tandem import envs
from tandem.contract import MANIFEST_FILE, MODEL_FILE, Manifest
from tandem.settings import TandemSettings
from tandem.tasks import Task, TaskFile, banking77

log = logging.getLogger(__name__)

MB = 1e6
WARMUP = 20


def _default_students() -> dict[str, FitConfig]:
    return {"two_layer": FitConfig(layers=2, lr=3e-4), "compact": COMPACT_STUDENT}


class StudentBenchConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_STUDENT_")

    task: TaskFile = Field(default_factory=banking77, description="The task the students are trained for.")
    students: dict[str, FitConfig] = Field(
        default_factory=_default_students, description="The students compared, by name: two_layer is the "
        "MiniLM's first 2 layers on the full vocabulary (the student before issue 13), compact the shipped one.",
    )
    teacher_dir: Path | None = Field(
        None, description="The teacher they are measured against (and the compact one is cut from); default: "
        "TANDEM_CACHE_DIR/models/<task>/teacher, `tandem train teacher`'s.",
    )
    seed: int = 0
    latency_texts: int = Field(500, ge=1, description="Test texts timed one at a time, the same for every student.")


def run_student_bench(cfg: StudentBenchConfig, out: Path) -> dict[str, Any]:
    teacher_dir = cfg.teacher_dir or TrainConfig.model_construct(task=cfg.task).model_dir("teacher")
    test = cfg.task.load("test")
    texts, truth = [e.text for e in test], [e.label for e in test]
    teacher_params, teacher_accuracy = _teacher_params(teacher_dir), _teacher_accuracy(teacher_dir, texts, truth)
    unseen = oov_queries(cfg.task, teacher_dir, texts)
    result: dict[str, Any] = {
        "task": cfg.task.name, "teacher": {"dir": str(teacher_dir), "params": teacher_params,
                                           "accuracy": teacher_accuracy},
        "oov_queries": int(unseen.sum()), "test_queries": len(texts), "latency_texts": cfg.latency_texts,
        "students": {},
    }
    for name, fit in cfg.students.items():
        directory, seconds = _trained(cfg, name, fit, teacher_dir)
        correct = _correct(directory, texts, truth)
        params = onnx_params(directory)
        result["students"][name] = {
            "dir": str(directory), "fit": fit.model_dump(), "train_seconds": seconds,
            "params": params, "teacher_params": teacher_params, "params_ratio": params / teacher_params,
            "accuracy": float(correct.mean()), "teacher_accuracy": teacher_accuracy,
            "oov_accuracy": float(correct[unseen].mean()), "int8_mb": int8_mb(directory),
            "latency_ms": _latency(directory, texts[: cfg.latency_texts]),
        }
        log.info("%s: %s", name, result["students"][name])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def student_summary(artifact_dir: Path, teacher_dir: Path, task: Task | None = None) -> dict[str, Any]:
    """params, teacher_params, accuracy, teacher_accuracy (test split, as the edge answers) and
    int8_mb of a student artifact: the learning-loop benchmark's `student` entry."""
    test = (task or banking77()).load("test")
    texts, truth = [e.text for e in test], [e.label for e in test]
    return {
        "params": onnx_params(artifact_dir), "teacher_params": _teacher_params(teacher_dir),
        "accuracy": float(_correct(artifact_dir, texts, truth).mean()),
        "teacher_accuracy": _teacher_accuracy(teacher_dir, texts, truth), "int8_mb": int8_mb(artifact_dir),
    }


def format_table(result: dict[str, Any]) -> str:
    teacher = result["teacher"]
    lines = [f"teacher: {teacher['params']:,} params, test accuracy {teacher['accuracy']:.4f}; "
             f"{result['oov_queries']} of {result['test_queries']} test queries hold a wordpiece no train text uses",
             f"{'student':<10} {'params':>11} {'/teacher':>8} {'accuracy':>8} {'oov acc':>8} {'int8 MB':>8} "
             f"{'p50 ms':>7} {'p99 ms':>7}"]
    for name, s in result["students"].items():
        lines.append(f"{name:<10} {s['params']:>11,} {s['params_ratio']:>8.3f} {s['accuracy']:>8.4f} "
                     f"{s['oov_accuracy']:>8.4f} {s['int8_mb']:>8.2f} {s['latency_ms']['p50_ms']:>7.2f} "
                     f"{s['latency_ms']['p99_ms']:>7.2f}")
    return "\n".join(lines)


def onnx_params(artifact_dir: Path) -> int:
    """The parameters the edge downloads: the elements of the int8 model's weight initializers."""
    from cloud.training.compact import onnx_parameter_count

    return onnx_parameter_count((artifact_dir / MODEL_FILE).read_bytes())


def int8_mb(artifact_dir: Path) -> float:
    return (artifact_dir / MODEL_FILE).stat().st_size / MB


def oov_queries(task: Task, teacher_dir: Path, texts: list[str]) -> np.ndarray:
    """Per text: does its tokenization by the base (the teacher's) tokenizer hold a wordpiece
    that no training text of the task (train without its held-out splits: the pruned vocabulary's
    source) does?"""
    from cloud.training.data import tokenizer, training_texts

    tok = tokenizer(str(teacher_dir))
    tok.no_padding()
    tok.no_truncation()
    seen = {i for e in tok.encode_batch(training_texts(TrainConfig(task=task))) for i in e.ids}
    return np.array([not set(e.ids) <= seen for e in tok.encode_batch(texts)])


def _trained(cfg: StudentBenchConfig, name: str, fit: FitConfig, teacher_dir: Path) -> tuple[Path, float | None]:
    """The student's artifact, trained now (and the seconds it took) or cached (None)."""
    from cloud.training.student import train_student

    teacher = Manifest.read(teacher_dir).version if (teacher_dir / MANIFEST_FILE).is_file() else str(teacher_dir)
    key = json.dumps([cfg.task.model_dump(mode="json"), fit.model_dump(), cfg.seed, teacher], sort_keys=True)
    root = envs.TANDEM_CACHE_DIR / "bench" / "students"
    directory = root / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (directory / MANIFEST_FILE).is_file():
        log.info("student %s: cached in %s", name, directory)
        return directory, None
    log.info("training student %s", name)
    train = TrainConfig.model_construct(
        **{**TrainConfig.model_construct().__dict__, "task": cfg.task, "seed": cfg.seed, "student": fit,
           "output_dir": teacher_dir.parent, "signing_key": root / "bench-signing.pem", "dev_keys": True})
    started = time.monotonic()
    train_student(train, directory)
    return directory, round(time.monotonic() - started, 1)


def _correct(artifact_dir: Path, texts: list[str], truth: list[str]) -> np.ndarray:
    """Per text: is the student's closed-set answer (its own labels, no boundary) the truth?"""
    from edge.student import Student

    student = Student.load(artifact_dir)
    model_labels = len(json.loads((artifact_dir / "labels.json").read_text()))
    predicted = student.predict(texts)[:, :model_labels].argmax(-1)
    return np.array([student.labels[p] == t for p, t in zip(predicted, truth)])


def _latency(artifact_dir: Path, texts: list[str]) -> dict[str, float]:
    """One text per call through the edge's `Student` (tokenizer, ONNX Runtime on 1 thread)."""
    from edge.student import Student

    student = Student.load(artifact_dir)
    student.predict(texts[:WARMUP])
    recorder = LatencyRecorder()
    for text in texts:
        started = time.perf_counter()
        student.predict([text])
        recorder.record(time.perf_counter() - started)
    return recorder.summary()


def _teacher_params(teacher_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(teacher_dir / "model.safetensors"), framework="numpy") as f:
        return int(sum(np.prod(f.get_slice(k).get_shape()) for k in f.keys()))


def _teacher_accuracy(teacher_dir: Path, texts: list[str], truth: list[str]) -> float:
    from transformers import AutoModelForSequenceClassification

    from cloud.training.data import tokenizer
    from cloud.training.loop import encode, predict_logits

    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    max_length = Manifest.read(teacher_dir).fit["max_length"] if (teacher_dir / MANIFEST_FILE).is_file() else 64
    predicted = predict_logits(model, encode(tokenizer(str(teacher_dir)), texts, max_length)).argmax(-1)
    return float(np.mean([model.config.id2label[int(p)] == t for p, t in zip(predicted, truth)]))
