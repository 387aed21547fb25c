"""`tandem train student`: the base model's first layers, exported to int8 ONNX and calibrated.

The artifact directory holds `contract.STUDENT_FILES` (model, tokenizer, labels, manifest) and
the manifest's signature: everything the edge needs, nothing it must not import. It is signed
(sequence 0, below every registry version) because an edge with the updater on verifies its
configured artifact too.
"""

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from cloud.training.artifact import write_manifest
from cloud.training.base_model import build_classifier, tokenizer_json
from cloud.training.calibration import calibrate, expected_calibration_error, open_accuracy, softmax
from cloud.training.compact import distil_from_teacher, parameter_count, student_fit
from cloud.training.config import DistillConfig, FitConfig, OperatingPointConfig, TrainConfig
from cloud.training.data import Splits, load_splits, training_texts
from cloud.training.export import export_onnx, onnx_logits, quantize_int8
from cloud.training.gate import Outcomes, artifact_outcomes
from cloud.training.loop import fit, predict_logits
from cloud.training.operating_point import fit_operating_point
from cloud.training.soft_labels import teacher_logits
from tandem.contract import LABELS_FILE, MODEL_FILE, TOKENIZER_FILE, OperatingPoint
from tandem.fsio import atomic_dir
from tandem.signing import sign_artifact, signing_key

log = logging.getLogger(__name__)


def train_student(cfg: TrainConfig, out: Path, parent: str | None = None) -> dict[str, Any]:
    """The student on the full labelled train split: distilled from the cached teacher and cut
    from it (`FitConfig.init` teacher), or the base model's first layers on the hard labels."""
    key = signing_key(cfg.signing_key_path(), cfg.dev_keys)  # before training: a missing key fails fast
    fit_cfg = student_fit(cfg.student, training_texts(cfg), cfg.model_dir("teacher"))
    splits = load_splits(cfg, fit_cfg)
    model = build_classifier(splits.label_names, fit_cfg.layers, fit_cfg.base_model)
    if fit_cfg.init == "teacher":
        defaults = DistillConfig.model_fields  # the retrainer's KD temperature and weight
        distil_from_teacher(model, fit_cfg, cfg.model_dir("teacher"), splits.label_names, splits.train,
                            defaults["kd_temperature"].default, defaults["alpha"].default, cfg.seed)
    else:
        fit(model, splits.train.ids, splits.train.labels, fit_cfg, cfg.seed, desc="student")
    with atomic_dir(out) as scratch:
        fields = export_student(model, fit_cfg, splits, scratch, cfg.task.oos_label, cfg.known_rejection)
        val = artifact_outcomes(scratch, splits.val, splits.label_names, fields)
        point = operating_point(scratch, splits, fields, val, _expert_correct(cfg, splits), cfg.operating_point)
        write_manifest(scratch, kind="student", task=cfg.task.name, parent=parent, train_examples=len(splits.train.ids),
                       label_set_version=cfg.task.label_set_version, params=parameter_count(model),
                       operating_point=point, **fields)
        return sign_artifact(scratch, key).model_dump(mode="json")


def _expert_correct(cfg: TrainConfig, splits: Splits) -> np.ndarray:
    """Whether the expert (the cached teacher) answers each validation text correctly: what the
    cascade gets below the threshold."""
    logits, _ = teacher_logits(cfg.model_dir("teacher"), splits.label_names, splits.val.texts, cfg.student.max_length)
    return logits.argmax(-1) == splits.val.labels


def export_student(model: PreTrainedModel, fit_cfg: FitConfig, splits: Splits, directory: Path, oos_label: str,
                   known_rejection: float) -> dict[str, Any]:
    """Writes the edge's files (int8 model, tokenizer, labels) into `directory`; returns the
    manifest fields that describe them: payload, temperature, out-of-scope boundary, test metrics."""
    test_fp32 = predict_logits(model, splits.test.ids)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        export_onnx(model, fp32)
        quantize_int8(fp32, directory / MODEL_FILE)
    # Calibrate the model the edge runs (int8), not the torch one.
    calibration = calibrate(onnx_logits(directory / MODEL_FILE, splits.val.ids), splits.val.labels, splits.label_names,
                            oos_label, known_rejection)
    test_int8 = onnx_logits(directory / MODEL_FILE, splits.test.ids)
    (directory / TOKENIZER_FILE).write_bytes(tokenizer_json(fit_cfg.base_model))
    (directory / LABELS_FILE).write_text(json.dumps(splits.label_names, indent=1) + "\n")
    return {
        "payload": MODEL_FILE,
        "fit": fit_cfg.model_dump(),
        "layers": model.config.num_hidden_layers,
        "max_length": fit_cfg.max_length,
        **calibration,
        "metrics": _metrics(test_fp32, test_int8, splits.test.labels, splits.label_names, calibration),
    }


def operating_point(directory: Path, splits: Splits, fields: dict[str, Any], val: Outcomes, expert_ok: np.ndarray,
                    cfg: OperatingPointConfig) -> OperatingPoint:
    """The escalation thresholds of the exported student in `directory` (its manifest `fields`):
    fitted on its validation outcomes `val` against the expert's (`expert_ok`, per validation
    text), and risk-controlled on the calibration split, which nothing else uses."""
    calib = artifact_outcomes(directory, splits.calib, splits.label_names, fields)
    point = fit_operating_point(val.confidence, val.correct, expert_ok, calib.confidence, calib.correct, cfg)
    log.info("threshold %.3f for %s %.3f: %.1f%% of held-out texts escalated, cascade accuracy %.1f%%; "
             "risk-controlled: %s", point.threshold, point.objective, point.target,
             100 * point.fitted["escalation_rate"], 100 * point.fitted["cascade_accuracy"],
             ", ".join(f"eps {r.epsilon:g} -> {'none' if r.threshold is None else f'{r.threshold:.3f}'}"
                       for r in point.risk))
    return point


def _metrics(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, label_names: list[str],
             calibration: dict[str, Any]) -> dict[str, float]:
    """Closed-set accuracy (the argmax of the model's own classes) and, with the boundary, open accuracy."""
    predicted = int8.argmax(-1)
    temperature = calibration["temperature"]
    return {
        "test_accuracy": float((predicted == labels).mean()),
        "test_open_accuracy": open_accuracy(int8, labels, label_names, calibration),
        "test_accuracy_fp32": float((fp32.argmax(-1) == labels).mean()),
        "int8_fp32_agreement": float((predicted == fp32.argmax(-1)).mean()),
        "test_ece_uncalibrated": expected_calibration_error(softmax(int8), labels),
        "test_ece": expected_calibration_error(softmax(int8, temperature), labels),
    }
