"""`tandem train distill`: one retraining round of the learning loop, or a schedule of rounds.

A round builds the training set (a labelled seed of the task's data plus feedback), labels it
softly with the teacher, distils a fresh student in a Ray task, exports it (int8 ONNX,
temperature), checks it and judges it against the promoted version on the held-out validation
split in this process, signs and publishes it, and promotes it (a signed promotion) only if the
gate passes. Every candidate is published, so a rejected one can be inspected; edges only ever
fetch the promoted one. Each step that matters is appended to the audit log.
"""

import contextlib
import json
import logging
import math
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import ray

from cloud.audit import AuditLog
from cloud.registry import ModelRegistry
from cloud.training.artifact import write_manifest
from cloud.training.base_model import build_classifier, tokenizer_json
from cloud.training.config import DistillConfig
from cloud.training.compact import distil_from_teacher, parameter_count, student_fit
from cloud.training.data import Split, Splits, load_splits, training_texts
from cloud.training.distill_data import DistillSet, FeedbackExample, build_distill_set, corroborate, read_feedback
from cloud.training.gate import Outcomes, artifact_outcomes, judge
from cloud.training.loop import fit_loss
from cloud.training.quiet import quiet_third_party
from cloud.training.soft_labels import distillation_loss, teacher_logits
from cloud.training.student import export_student, operating_point
from tandem.contract import (LABELS_FILE, MANIFEST_FILE, MODEL_FILE, ONNX_INPUTS, ONNX_OUTPUT, STUDENT_FILES,
                             TOKENIZER_FILE, Manifest)
from tandem.signing import manifest_sha256, sign_artifact, signing_key

log = logging.getLogger(__name__)


def run_distill(cfg: DistillConfig, feedback: list[FeedbackExample] | None = None) -> dict[str, Any]:
    """One round; `feedback` defaults to the task's records in the feedback store.

    Returns the new version, whether it was promoted, its metrics, the gate, how its
    corrections were corroborated and the seconds taken. The audit log gets the publish (with
    the version's lineage), each use of the signing key, and the promotion or the rejection.
    """
    started = time.monotonic()
    task = cfg.task.name
    key = signing_key(cfg.signing_key_path(), cfg.dev_keys)  # before training: a missing key fails fast
    audit = AuditLog(cfg.audit_log_uri())
    registry = ModelRegistry(cfg.registry_root())
    parent = registry.promoted(task)
    log.info("%s: reading the task's data and feedback; promoted now: %s", task, parent)
    # A student cut from the teacher reads the cut's pruned tokenizer: `student.base_model` names the cut.
    cfg = cfg.model_copy(update={"student": student_fit(cfg.student, training_texts(cfg.splits_config()), cfg.teacher_path())})
    splits = load_splits(cfg.splits_config(), cfg.student)
    feedback = read_feedback(cfg.feedback_store_uri(), task) if feedback is None else feedback
    data = build_distill_set(splits, feedback, cfg.seed_fraction, cfg.student.max_length, cfg.corroboration_devices)
    # One pass of the teacher: the training texts' soft labels, and which validation texts the
    # expert answers correctly (the cascade's accuracy below a threshold: the gate's target).
    logits, teacher = teacher_logits(cfg.teacher_path(), splits.label_names, data.texts + splits.val.texts,
                                     cfg.student.max_length)
    soft, expert_ok = logits[: len(data.texts)], logits[len(data.texts):].argmax(-1) == splits.val.labels
    data = corroborate(data, soft)
    log.info(
        "%s: %d labelled examples (seed_fraction %s), feedback %s (%d dropped), corrections %s",
        task, data.labelled, cfg.seed_fraction, data.feedback or "none", data.dropped, data.corrections,
    )
    files, fields = train_candidate(cfg, splits, data, soft)
    lineage = _lineage(cfg, data, teacher, feedback)
    try:
        check_candidate(files, fields, splits.label_names, cfg.student.max_length, cfg.student.base_model)
    except CandidateError as exc:
        audit.append("reject_candidate", "retrainer", task=task, version=None, parent=parent, reason=str(exc))
        raise
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp)
        for name, content in files.items():
            (candidate / name).write_bytes(content)
        log.info("%s: judging the candidate against %s", task, parent or "no promoted version")
        # On the bytes just checked, in this process: what is signed next is what was judged.
        val = artifact_outcomes(candidate, splits.val, splits.label_names, fields)
        point = operating_point(candidate, splits, fields, val, expert_ok, cfg.operating_point)
        promoted = None if parent is None else registry.path(task, parent)
        gate = judge(val, None if promoted is None else _promoted_outcomes(promoted, splits), expert_ok,
                     splits.val.labels, splits.label_names, cfg,
                     new_label_set=promoted is not None
                     and cfg.task.label_set_version > Manifest.read(promoted).label_set_version)
        write_manifest(candidate, kind="student", task=task, parent=parent, gate=gate, operating_point=point,
                       sequence=registry.next_sequence(task), label_set_version=cfg.task.label_set_version,
                       **lineage, **fields)
        manifest = sign_artifact(candidate, key)
        signed_sha256 = manifest_sha256((candidate / MANIFEST_FILE).read_bytes())
        audit.append("key_use", "retrainer", key_id=manifest.key_id, task=task, version=manifest.version,
                     signed="manifest")
        version = registry.publish(task, candidate)
    audit.append(
        "publish", "retrainer", task=task, version=version, parent=parent, sequence=manifest.sequence,
        key_id=manifest.key_id, manifest_sha256=signed_sha256, lineage=lineage, gate=gate,
    )
    if gate["passed"]:
        promotion = registry.promote(task, version, key)
        audit.append("key_use", "retrainer", key_id=promotion.key_id, task=task, version=version, signed="promotion")
        audit.append("promote", "retrainer", task=task, version=version, previous=promotion.previous,
                     sequence=promotion.sequence, key_id=promotion.key_id, manifest_sha256=promotion.manifest_sha256)
    else:
        audit.append("reject_candidate", "retrainer", task=task, version=version, parent=parent,
                     reason="the gate did not pass", gate=gate)
    against = "nothing promoted" if parent is None else f"{gate['promoted_escalation_rate']:.1%} for {parent}"
    log.info(
        "%s: published %s, %s: escalates %.1f%% of held-out texts for the cascade to reach %.1f%% accuracy, against "
        "%s (min drop %s); labels regressed: %s", task, version, "promoted" if gate["passed"] else "not promoted",
        100 * gate["candidate_escalation_rate"], 100 * gate["target_accuracy"], against, cfg.min_escalation_drop,
        gate["regressed_labels"] or "none",
    )
    return {
        "task": task,
        "version": version,
        "promoted": gate["passed"],
        "parent": parent,
        "metrics": manifest.model_dump(mode="json")["metrics"],
        "gate": gate,
        "corrections": data.corrections,
        "seconds": round(time.monotonic() - started, 1),
    }


def _promoted_outcomes(directory: Path, splits: Splits) -> Outcomes:
    return artifact_outcomes(directory, splits.val, splits.label_names, Manifest.read(directory).model_dump())


def _lineage(cfg: DistillConfig, data: DistillSet, teacher: str, feedback: list[FeedbackExample]) -> dict[str, Any]:
    """What the candidate was trained on and how: for its signed manifest and its audit entry."""
    partitions: dict[str, Counter[str]] = defaultdict(Counter)
    for f in feedback:
        partitions[f"task={cfg.task.name}/date={f.date}" if f.date else "not from the store"][f.kind] += 1
    return {
        "train_examples": len(data.ids),
        "labelled_examples": data.labelled,
        "feedback_examples": data.feedback,
        "feedback_dropped": data.dropped,
        "feedback_corrections": data.corrections,
        "feedback_partitions": {p: dict(kinds) for p, kinds in sorted(partitions.items())},
        "distill": {
            "teacher": teacher,
            "kd_temperature": cfg.kd_temperature,
            "alpha": cfg.alpha,
            "seed_fraction": cfg.seed_fraction,
            "corroboration_devices": cfg.corroboration_devices,
        },
    }


class CandidateError(Exception):
    """What a training task returned is not a well-formed student of the task: it is not signed."""


def check_candidate(files: dict[str, bytes], fields: dict[str, Any], label_names: list[str], max_length: int,
                    base_model: str | None = None) -> None:
    """Checks a candidate from a training task before this process signs it: the training
    cluster is not trusted with the key, so the signer checks what it would vouch for. The
    files are exactly the student's, the labels are the task's, the tokenizer is `base_model`'s
    (the configured student's, not what the candidate claims; for a student cut from the teacher,
    the cut's pruned one, which `compact.student_fit` rebuilds from the teacher and the task's
    train texts), and ONNX Runtime
    loads the model with the edge's inputs and one output per label. (Its accuracy is the gate's.)"""
    expected = set(STUDENT_FILES) - {MANIFEST_FILE}
    if set(files) != expected:
        raise CandidateError(f"candidate files {sorted(files)} are not the student's {sorted(expected)}")
    if fields.get("payload") != MODEL_FILE or fields.get("max_length") != max_length:
        raise CandidateError(f"candidate payload/max_length {fields.get('payload')}/{fields.get('max_length')} "
                             f"are not {MODEL_FILE}/{max_length}")
    if json.loads(files[LABELS_FILE]) != label_names:
        raise CandidateError(f"candidate {LABELS_FILE} is not the task's labels, in the task's order")
    if files[TOKENIZER_FILE] != tokenizer_json(base_model):
        raise CandidateError(f"candidate {TOKENIZER_FILE} is not the tokenizer of base_model {base_model!r}")
    try:
        session = ort.InferenceSession(files[MODEL_FILE], providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors for bad graphs
        raise CandidateError(f"ONNX Runtime cannot load the candidate's {MODEL_FILE}: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = session.get_outputs()
    labels_out = [o.shape[-1] for o in outputs if o.name == ONNX_OUTPUT]
    if inputs != list(ONNX_INPUTS) or len(outputs) != 1 or labels_out != [len(label_names)]:
        raise CandidateError(f"candidate {MODEL_FILE} maps {inputs} to {[(o.name, o.shape) for o in outputs]}, not "
                             f"{list(ONNX_INPUTS)} to {ONNX_OUTPUT} with {len(label_names)} labels")


def run_schedule(cfg: DistillConfig) -> None:
    """A round now, then one every `interval_s` (just one if it is None). A failed scheduled round
    is logged with its traceback and the next one still runs."""
    with ray_session() if cfg.use_ray else contextlib.nullcontext():
        if cfg.interval_s is None:
            run_distill(cfg)
            return
        while True:
            started = time.monotonic()
            try:
                run_distill(cfg)
            except Exception:
                log.exception("distillation round of %s failed; the next starts on schedule", cfg.task.name)
            time.sleep(max(0.0, started + cfg.interval_s - time.monotonic()))


def train_candidate(
    cfg: DistillConfig, splits: Splits, data: DistillSet, soft: np.ndarray
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """`distil_student` in a Ray task reserving `num_cpus`, or in this process."""
    if not cfg.use_ray:
        log.info("distilling the student, then exporting it to int8 ONNX and calibrating it")
        return distil_student(cfg, splits, data, soft)
    log.info("distilling the student in a Ray task with %s CPUs, then exporting it to int8 ONNX and calibrating it",
             cfg.num_cpus)
    with ray_session():
        # Read once, when torch starts OpenMP in the worker: its threads otherwise spin while
        # waiting for work, taking the cores from everything else on a small shared machine.
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
        task = ray.remote(num_cpus=cfg.num_cpus, runtime_env=env)(distil_student)
        return ray.get(task.remote(cfg, splits, data, soft))


def distil_student(
    cfg: DistillConfig, splits: Splits, data: DistillSet, soft: np.ndarray
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Trains a fresh student on `data` and exports it: its files' bytes and manifest fields.

    Bytes, not a path: on a cluster the task may run on another node than the round.
    """
    quiet_third_party()  # in a Ray worker, a process that no `tandem` command set up
    fit_cfg = cfg.student.model_copy(update={"epochs": training_epochs(cfg, len(data.ids))})
    model = build_classifier(splits.label_names, fit_cfg.layers, fit_cfg.base_model)
    if fit_cfg.init == "teacher":  # a cut of the teacher (`compact.student_fit`): its [CLS] states and more text too
        distil_from_teacher(model, fit_cfg, cfg.teacher_path(), splits.label_names,
                            Split(data.ids, data.labels, data.texts), cfg.kd_temperature, cfg.alpha, cfg.seed)
    else:
        loss = distillation_loss(soft, data.labels, cfg.kd_temperature, cfg.alpha)
        fit_loss(model, data.ids, loss, fit_cfg, cfg.seed, desc="distil")
    with tempfile.TemporaryDirectory() as tmp:
        fields = export_student(model, fit_cfg, splits, Path(tmp), cfg.task.oos_label, cfg.known_rejection)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir()}, {**fields, "params": parameter_count(model)}


def training_epochs(cfg: DistillConfig, examples: int) -> float:
    """The student's epochs, raised so that training runs at least `min_steps` steps."""
    return max(cfg.student.epochs, cfg.min_steps / math.ceil(examples / cfg.student.batch_size))


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """Joins RAY_ADDRESS's cluster, else starts a local one; shuts down only what it started."""
    if ray.is_initialized():
        yield
        return
    ray.init(include_dashboard=False)  # a local dashboard would only take CPU from training
    try:
        yield
    finally:
        ray.shutdown()
