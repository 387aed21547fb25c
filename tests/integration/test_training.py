"""The training pipeline's outputs: ONNX parity with torch, and a complete, pinned artifact."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cloud.training.base_model import build_classifier
from cloud.training.data import tokenizer
from cloud.training.export import export_onnx, onnx_logits, quantize_int8
from cloud.training.loop import encode, predict_logits
from tandem.contract import LABELS_FILE, MANIFEST_FILE, MODEL_FILE, SIGNATURE_FILE, STUDENT_FILES, Manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, banking_texts: list[str]) -> tuple:
    model = build_classifier([f"label{i}" for i in range(77)], layers=2)
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(model, path)
    ids = encode(tokenizer(), banking_texts[:100] + ["a", "x " * 200], max_length=64)
    return model, path, ids


def test_onnx_logits_match_torch_for_any_batch_and_length(exported: tuple) -> None:
    model, path, ids = exported
    expected = predict_logits(model, ids)
    for batch_size in (1, 7, 64):  # one text, ragged batches, padded long ones
        np.testing.assert_allclose(onnx_logits(path, ids, batch_size), expected, atol=1e-4)


def test_int8_model_mostly_agrees_with_fp32(exported: tuple, tmp_path: Path) -> None:
    model, path, ids = exported
    quantize_int8(path, tmp_path / "int8.onnx")
    assert (tmp_path / "int8.onnx").stat().st_size < path.stat().st_size / 2.5
    agree = (onnx_logits(tmp_path / "int8.onnx", ids).argmax(-1) == predict_logits(model, ids).argmax(-1)).mean()
    assert agree > 0.8


def test_student_artifact_is_complete_and_pinned(student_dir: Path) -> None:
    assert sorted(p.name for p in student_dir.iterdir()) == sorted([*STUDENT_FILES, SIGNATURE_FILE])  # signed
    assert Manifest.read(student_dir).kind == "student"  # what the edge reads
    manifest = json.loads((student_dir / MANIFEST_FILE).read_text())
    labels = json.loads((student_dir / LABELS_FILE).read_text())
    categories = json.loads((Path(__import__("os").environ["TANDEM_DATA_DIR"]) / "banking77" / "categories.json").read_text())
    assert labels == categories
    assert manifest["sha256"] == hashlib.sha256((student_dir / MODEL_FILE).read_bytes()).hexdigest()
    assert manifest["kind"] == "student" and manifest["layers"] == 2 and manifest["task"] == "banking77"
    assert manifest["version"].startswith("banking77-student-") and manifest["parent"] is None
    assert 0.05 < manifest["temperature"] < 20
    metrics = manifest["metrics"]
    # 2 epochs on 3,000 examples: far above chance (1/77).
    assert 0.5 < metrics["test_accuracy"] <= 1
    # The out-of-scope boundary, fitted to turn away 5% of the held-out known texts: on a test
    # split of known intents only, it can only cost accuracy, and only a little.
    assert manifest["out_of_scope"] == {**manifest["out_of_scope"], "label": "out_of_scope", "known_rejection": 0.05}
    assert metrics["test_accuracy"] - 0.15 < metrics["test_open_accuracy"] <= metrics["test_accuracy"]
    # Fitted on the validation split, the temperature must leave the held-out split well
    # calibrated, and never meaningfully worse than no scaling (the student may already
    # be calibrated, T close to 1: the strict improvement is tested in the unit tests).
    assert metrics["test_ece"] < 0.08
    assert metrics["test_ece"] <= metrics["test_ece_uncalibrated"] + 0.01
    assert not list(student_dir.parent.glob(".student.*")), "scratch directories left behind"
    # Its escalation thresholds, fitted on the validation split against the expert (the teacher),
    # and certified on the calibration split: a larger error bound never needs a higher threshold.
    point = manifest["operating_point"]
    assert point["objective"] == "cascade_accuracy" and 0 <= point["threshold"] <= 1
    assert point["fitted"]["examples"] == 1000 and point["fitted"]["cascade_accuracy"] >= point["target"] - 1e-9
    assert point["risk_examples"] == 1000 and point["risk_delta"] == 0.05
    assert [r["epsilon"] for r in point["risk"]] == [0.01, 0.02, 0.03, 0.05, 0.075, 0.1]
    # A briefly trained student may certify none of them; those it does, a larger bound never raises.
    certified = [r["threshold"] for r in point["risk"] if r["threshold"] is not None]
    assert certified == sorted(certified, reverse=True)


def test_a_compact_student_is_cut_from_the_teacher_and_distilled(teacher_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from cloud.training.compact import parameter_count
    from cloud.training.config import FitConfig, TrainConfig
    from cloud.training.student import train_student
    from edge.student import Student

    fit = FitConfig(layers=1, init="teacher", vocabulary="task", intermediate_size=128, augment=1, hidden_weight=1.0,
                    epochs=1, max_examples=1000, lr=3e-4, head_lr=5e-4)
    cfg = TrainConfig(output_dir=teacher_dir.parent, student=fit, signing_key=tmp_path / "key.pem", dev_keys=True)
    manifest = train_student(cfg, tmp_path / "student")
    teacher_params = parameter_count(AutoModelForSequenceClassification.from_pretrained(teacher_dir))
    assert manifest["params"] < teacher_params / 3 and manifest["layers"] == 1
    student = Student.load(tmp_path / "student")
    vocab = json.loads((tmp_path / "student" / "tokenizer.json").read_text())["model"]["vocab"]
    assert 2000 < len(vocab) < 4000  # banking77's train pieces and the Latin single characters, of 30,522
    # A word no train text has is still read as pieces, not [UNK], and answered.
    assert "[UNK]" not in student._tokenizer.encode("zyxwvut cryptocurrency refund").tokens
    assert np.isfinite(student.predict(["zyxwvut cryptocurrency refund"])).all()


def test_a_cut_that_keeps_every_layer_and_neuron_answers_as_the_teacher(teacher_dir: Path,
                                                                         banking_texts: list[str]) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForSequenceClassification

    from cloud.training.base_model import tokenizer_json
    from cloud.training.compact import compact_classifier
    from cloud.training.config import FitConfig
    from cloud.training.vocab import prune_tokenizer
    from tandem.tasks import banking77

    train = [e.text for e in banking77().load("train")]
    pruned, old_ids = prune_tokenizer(tokenizer_json(str(teacher_dir)), train)
    cut = compact_classifier(teacher_dir, old_ids, FitConfig(init="teacher", vocabulary="task"), train)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    ids = encode(Tokenizer.from_str(pruned.decode()), banking_texts, 64)
    base_ids = encode(tokenizer(str(teacher_dir)), banking_texts, 64)
    # Only the vocabulary is cut: on texts made of kept pieces, the teacher's answers exactly (a
    # test text with a piece no train text has is segmented into other pieces).
    same = [i for i, (x, y) in enumerate(zip(ids, base_ids)) if [old_ids[t] for t in x] == y]
    assert len(same) > 0.9 * len(banking_texts)
    expected = predict_logits(teacher, base_ids)
    np.testing.assert_allclose(predict_logits(cut, ids)[same], expected[same], atol=1e-4)


def test_a_student_cut_from_the_teacher_needs_one(tmp_path: Path) -> None:
    from cloud.training.config import FitConfig, TrainConfig
    from cloud.training.student import train_student

    cfg = TrainConfig(output_dir=tmp_path, student=FitConfig(layers=1, init="teacher"), signing_key=tmp_path / "k.pem",
                      dev_keys=True)
    with pytest.raises(FileNotFoundError, match="no teacher checkpoint at .*tandem train teacher"):
        train_student(cfg, tmp_path / "student")
