"""Retraining rounds end to end: distil, gate against the promoted version, sign, publish.

Tiny real models (about two minutes on 2 cores): a first round promotes its student; a
deliberately worse one, trained on Ray, is published but rejected by the gate.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.traffic import traffic_examples
from cloud.feedback import FeedbackStore
from cloud.registry import ModelRegistry
from cloud.training.config import DistillConfig, FitConfig, TrainConfig
from cloud.training.data import load_splits
from cloud.training.distill import run_distill
from cloud.training.distill_data import FeedbackExample, read_feedback
from cloud.training.teacher import train_teacher
from edge.student import Student
from tandem.signing import VerificationError, generate_key, load_public_key, public_path, verify_artifact
from tandem.v1 import fleet_pb2

pytestmark = pytest.mark.integration

FEEDBACK = [
    FeedbackExample("CORRECTION", "my new card still has not come after two weeks", "card_arrival"),
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
    return DistillConfig(
        teacher_dir=teacher_dir,
        registry_dir=root / "registry",
        signing_key=root / "keys" / "signing.pem",
        min_steps=0,
        **fields,
    )


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
    teacher = json.loads((teacher_dir / "manifest.json").read_text())["version"]
    assert manifest["distill"] == {"teacher": teacher, "kd_temperature": 2.0, "alpha": 0.5, "seed_fraction": 1.0}
    assert 0.05 < manifest["temperature"] < 20 and manifest["metrics"]["test_accuracy"] > 0.2
    student = Student(directory)
    assert student.version == good["version"] and student.predict(["where is my card?"]).shape == (1, 77)


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
    key = load_public_key(public_path(root / "keys" / "signing.pem"))
    for result in rounds:
        assert verify_artifact(registry.path("banking77", result["version"]), key)["version"] == result["version"]
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

    with pytest.raises(VerificationError, match="signature does not verify"):
        verify_artifact(promoted, generate_key(tmp_path / "other.pem"))


def test_feedback_is_read_from_the_store_once_per_record(tmp_path: Path) -> None:
    store = FeedbackStore(str(tmp_path / "feedback"))
    record = fleet_pb2.FeedbackRecord
    correction = record(record_id="c1", task="banking77", kind=fleet_pb2.CORRECTION, text="card?",
                        label="card_arrival", created_unix_ms=1)
    fallback = record(record_id="f1", task="banking77", kind=fleet_pb2.FALLBACK, text="hi", created_unix_ms=2)
    other = record(record_id="o1", task="other", kind=fleet_pb2.AUDIT, text="x", created_unix_ms=3)
    store.add([correction, fallback, other])
    store.add([correction])
    assert read_feedback(str(tmp_path / "feedback"), "banking77") == [
        FeedbackExample("CORRECTION", "card?", "card_arrival"),
        FeedbackExample("FALLBACK", "hi", ""),
    ]
    assert read_feedback(str(tmp_path / "empty"), "banking77") == []


def test_traffic_is_train_without_the_seed_and_the_held_out_split() -> None:
    cfg = DistillConfig()
    splits = load_splits(cfg.splits_config(), cfg.student)
    train = cfg.task.load("train")
    traffic = traffic_examples(cfg.task, splits, 0.1, cfg.student.max_length)
    # 1,000 held out, then a seed of 10% of the other 9,003 (901); a few duplicate texts go too.
    assert len(train) - 1000 - 901 - 20 <= len(traffic) <= len(train) - 1000 - 901
    assert set(traffic) <= set(train)
    # No traffic text is a seed or held-out text (rebuilt here the way load_splits orders train).
    order = np.random.default_rng(cfg.seed).permutation(len(train))
    n_val = int(len(train) * cfg.val_fraction)
    held_out = {train[i].text for i in order[:n_val]}
    seed = {train[i].text for i in order[n_val:][: math.ceil((len(train) - n_val) * 0.1)]}
    assert not {e.text for e in traffic} & (held_out | seed)
    assert len(traffic_examples(cfg.task, splits, 1.0, cfg.student.max_length)) <= 20  # all seed or held out
