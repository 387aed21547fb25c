"""A base model of the user's choosing: a tiny BERT with its own tokenizer, not the default, goes
through teacher and student training, the edge's student, vLLM's classify runner and a
distillation round whose teacher and student tokenize differently."""

import csv
import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

from cloud.training.base_model import tokenizer_json
from cloud.training.config import DistillConfig, TrainConfig
from cloud.training.data import tokenizer
from cloud.training.loop import encode, predict_logits
from tandem.contract import LABELS_FILE, TOKENIZER_FILE, Manifest
from tandem.tasks import Task
from tests.tiny_bert import INTENTS, TINY_FIT, build_tiny_bert, tiny_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-intent task (the reserved out-of-scope label is added), 360 train and 90 test rows."""
    root = tmp_path_factory.mktemp("task")
    for split, seed, n in (("train", 1, 360), ("test", 2, 90)):
        with (root / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *tiny_rows(INTENTS, seed, n)])
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "train": str(root / "train.csv"), "test": str(root / "test.csv"),
                                    "labels": list(INTENTS)}))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, task_file: Path) -> Path:
    texts = [e.text for e in Task.from_file(task_file).load("train")]
    return build_tiny_bert(tmp_path_factory.mktemp("base") / "tiny-bert", texts)


@pytest.fixture(scope="module")
def train_cfg(tmp_path_factory: pytest.TempPathFactory, task_file: Path, base: Path) -> TrainConfig:
    fit = TINY_FIT.model_copy(update={"base_model": str(base)})
    return TrainConfig(task=task_file, teacher=fit, student=fit.model_copy(update={"layers": 1}),
                       signing_key=tmp_path_factory.mktemp("keys") / "signing.pem", dev_keys=True)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, train_cfg: TrainConfig) -> Path:
    from cloud.training.teacher import train_teacher

    out = tmp_path_factory.mktemp("models") / "teacher"
    train_teacher(train_cfg, out)
    return out


def test_a_checkpoint_without_tokenizer_json_gets_one_from_its_fast_tokenizer(tmp_path: Path) -> None:
    from cloud.training.base_model import base_dir

    default = Path(base_dir(None))
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default / name, tmp_path / name)
    text = ["My card hasn't arrived, où est-elle?"]
    assert encode(tokenizer(str(tmp_path)), text, 64) == encode(tokenizer(None), text, 64)


def test_student_artifact_carries_the_base_models_tokenizer_and_answers_with_its_labels(
    tmp_path: Path, train_cfg: TrainConfig, base: Path, teacher_dir: Path
) -> None:
    from cloud.training.student import train_student
    from edge.student import Student

    # The teacher is the expert whose answers the student's threshold is fitted against.
    train_student(train_cfg.model_copy(update={"output_dir": teacher_dir.parent}), tmp_path / "student")
    artifact = (tmp_path / "student" / TOKENIZER_FILE).read_bytes()
    assert artifact == (base / "tokenizer.json").read_bytes() and artifact != tokenizer_json(None)
    assert Tokenizer.from_str(artifact.decode()).get_vocab_size() <= 300  # the default's: 30,522
    manifest = Manifest.read(tmp_path / "student")
    assert manifest.layers == 1 and manifest.fit["base_model"] == str(base)
    student = Student.load(tmp_path / "student")
    labels = train_cfg.task.label_names()
    assert student.labels == labels == [*INTENTS, train_cfg.task.oos_label]
    probs = student.predict(["i lost my card", "what is my balance today", "send money to my sister"])
    assert probs.shape == (3, len(labels)) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    assert manifest.metrics["test_accuracy"] > 0.5  # chance: 1/3


# Raised by torch's own modules as vLLM imports them.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
async def test_teacher_checkpoint_serves_on_vllms_classify_runner(
    teacher_dir: Path, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForSequenceClassification
    from vllm import PoolingParams

    from cloud.config import ExpertConfig
    from cloud.experts.engine import build_engine

    assert (teacher_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    expert = ExpertConfig(name="tiny-teacher", kind="classify", model=str(teacher_dir), dtype="float32",
                          max_model_len=64)
    for name, value in {**expert.env, "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}.items():
        monkeypatch.setenv(name, value)
    texts = ["my card was stolen", "how much money is in my account"]
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    logits = predict_logits(model, encode(tokenizer(str(teacher_dir)), texts, TINY_FIT.max_length))
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    engine = build_engine(expert)
    try:
        for i, text in enumerate(texts):
            async for output in engine.encode(text, PoolingParams(task="classify"), request_id=f"tiny-{i}"):
                final = output
            # vLLM tokenizes with the checkpoint's files as training did: the same probabilities.
            np.testing.assert_allclose(np.asarray(final.outputs.data), expected[i], atol=1e-4)
    finally:
        engine.shutdown()
        del engine
        gc.collect()  # now, not at interpreter exit, where vLLM's __del__ fails on torn-down modules


def test_distillation_tokenizes_for_the_teacher_and_the_student_each(
    tmp_path: Path, teacher_dir: Path, task_file: Path, base: Path
) -> None:
    from cloud.registry import ModelRegistry
    from cloud.training.distill import run_distill
    from cloud.training.distill_data import FeedbackExample

    texts = [e.text for e in Task.from_file(task_file).load("train")]
    # Digits in its alphabet: every letter has another id than in the teacher's vocabulary, so
    # the teacher would read the student's ids as noise.
    student_base = build_tiny_bert(tmp_path / "other-bert", [*texts, "0 1 2 3 4 5 6 7 8 9"], seed=1)
    assert tokenizer(str(student_base)).token_to_id("a") != tokenizer(str(base)).token_to_id("a")
    cfg = DistillConfig(
        task=task_file, teacher_dir=teacher_dir, registry_dir=tmp_path / "registry",
        feedback_uri=str(tmp_path / "feedback"), signing_key=tmp_path / "keys" / "signing.pem", dev_keys=True,
        use_ray=False, min_steps=0, alpha=1.0,  # the teacher's soft labels only: no hard label teaches
        student=TINY_FIT.model_copy(update={"base_model": str(student_base), "layers": 1}),
    )
    result = run_distill(cfg, [FeedbackExample("FALLBACK", "block my card please now", "", "kiosk-1")])
    assert result["promoted"] and result["metrics"]["test_accuracy"] > 0.5  # chance: 1/3
    version = ModelRegistry(cfg.registry_root()).path("tiny", result["version"])
    assert (version / TOKENIZER_FILE).read_bytes() == (student_base / "tokenizer.json").read_bytes()
    # The model's classes: the task's labels, less the out-of-scope one its boundary answers.
    assert json.loads((version / LABELS_FILE).read_text()) == cfg.task.label_names()[:-1]
    assert Manifest.read(version).out_of_scope.label == cfg.task.label_names()[-1] == "out_of_scope"
    assert Manifest.read(version).fit["base_model"] == str(student_base)
