"""Adding a label end to end: texts of an intent the task does not have reach the feedback store
answered out of scope from three devices; `tandem intents clusters` shows them, `tandem intents
name` makes them a label of the task file, the expert round (`tandem train expert`) fine-tunes the expert (a tiny
BERT with its own tokenizer, as in test_base_model.py) into a signed checkpoint that answers the
new label, and a distillation round from it gives the edge a student that knows it too."""

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoModelForSequenceClassification

from cloud.feedback import FeedbackStore
from cloud.training.config import DistillConfig, TrainConfig
from cloud.training.data import tokenizer
from cloud.training.loop import encode, predict_logits
from tandem.settings import load_config
from tandem.signing import Keyring, public_path, trust, verify_artifact
from tandem.tasks import Task
from tandem.v1 import fleet_pb2
from tests.tiny_bert import INTENTS, TINY_FIT, build_tiny_bert, tiny_rows

pytestmark = pytest.mark.integration

# The intent the task lacks: the field sends it, an operator names it.
NEW = ("crypto", ["can i buy bitcoin in the app", "do you support crypto trading", "i want to sell my ethereum",
                  "how do i hold cryptocurrency like bitcoin"])
def _tandem(*args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_a_cluster_named_by_the_operator_becomes_a_label_the_expert_and_the_student_answer(tmp_path: Path) -> None:
    from cloud.training.config import ExpertTrainConfig
    from cloud.training.distill import run_distill
    from cloud.training.expert import run_expert
    from cloud.training.teacher import train_teacher
    from edge.student import Student

    for split, seed, n in (("train", 1, 360), ("test", 2, 90)):
        with (tmp_path / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *tiny_rows(INTENTS, seed, n)])
    task_file = tmp_path / "tiny.yaml"
    task_file.write_text(f"name: tiny\nlabel_set_version: 1\ntrain: {tmp_path / 'train.csv'}\n"
                         f"test: {tmp_path / 'test.csv'}\nlabels:   # kept as written\n"
                         + "".join(f"  {name}: about {name}\n" for name in INTENTS))
    field = sorted({text for text, _ in tiny_rows({NEW[0]: NEW[1]}, 3, 60)})
    base = build_tiny_bert(tmp_path / "tiny-bert", [t for t, _ in tiny_rows(INTENTS, 1, 360)] + field)
    key = tmp_path / "keys" / "signing.pem"
    train_cfg = TrainConfig(task=task_file, teacher=TINY_FIT.model_copy(update={"base_model": str(base)}),
                            signing_key=key, dev_keys=True)
    train_teacher(train_cfg, tmp_path / "teacher")

    # The field: the new intent's texts answered out of scope, from three devices.
    store = tmp_path / "feedback"
    now = int(time.time() * 1000)
    FeedbackStore(str(store)).add([fleet_pb2.FeedbackRecord(
        record_id=f"esc/edge-{i % 3}/{i}", request_id=f"r{i}", task="tiny", kind=fleet_pb2.ESCALATION, text=text,
        label="out_of_scope", device_id=f"edge-{i % 3}", created_unix_ms=now, label_set_version=1,
    ) for i, text in enumerate(field)])
    distill_cfg = tmp_path / "distill.yaml"
    distill_cfg.write_text(yaml.safe_dump({
        "task": str(task_file), "teacher_dir": str(tmp_path / "teacher"), "registry_dir": str(tmp_path / "registry"),
        "feedback_uri": str(store), "signing_key": str(key), "dev_keys": True, "use_ray": False, "min_steps": 200,
        "student": {**TINY_FIT.model_dump(), "base_model": str(base), "layers": 1}}))

    shown = _tandem("intents", "clusters", "--config", str(distill_cfg))
    clusters = re.findall(r"^(c-[0-9a-f]{8})\s+(\d+)\s+(\d+)", shown, re.MULTILINE)
    assert clusters and {int(devices) for _, _, devices in clusters} == {3}, shown
    # The operator reads them and names each: the first adds the label, the others add examples of it.
    named = [json.loads(_tandem("intents", "name", cluster, NEW[0], "--description", "buying or holding crypto",
                                "--config", str(distill_cfg))) for cluster, _, _ in clusters]
    assert [n["new_label"] for n in named] == [True] + [False] * (len(named) - 1)
    assert {n["label_set_version"] for n in named} == {2}
    assert [n["stored"] for n in named] == [int(size) for _, size, _ in clusters]
    task = Task.from_file(task_file)
    assert task.label_names() == [*INTENTS, NEW[0], "out_of_scope"] and "# kept as written" in task_file.read_text()

    # A tiny BERT from scratch needs the high rates it was trained with (the defaults suit MiniLM).
    tiny = ExpertTrainConfig(lr=1e-3, head_lr=1e-2, epochs=5, replay_per_label=40, batch_size=16)
    result = run_expert(load_config(DistillConfig, distill_cfg).model_copy(update={"expert": tiny}))
    assert result["passed"] and result["lineage"]["field_labels"] == {NEW[0]: sum(n["stored"] for n in named)}
    expert = Path(result["path"])
    assert expert.parent == tmp_path / "registry" / "tiny" / "experts"
    trust(tmp_path / "keyring.json", public_path(key))
    manifest, _ = verify_artifact(expert, Keyring.load(tmp_path / "keyring.json"))
    assert manifest.kind == "teacher" and manifest.model_dump()["label_set_version"] == 2

    # The new expert's classes end with the new label, which it answers for texts of it (the old
    # labels' test texts stay right); recalibrated on the held-out split, which the manifest carries.
    unseen = ["hello there, do you support crypto trading thanks", "please can i buy bitcoin in the app now"]
    model = AutoModelForSequenceClassification.from_pretrained(expert)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert labels == [*INTENTS, NEW[0]] and manifest.temperature and manifest.out_of_scope.label == "out_of_scope"
    old = tiny_rows(INTENTS, 2, 90)
    answers = [labels[i] for i in predict_logits(
        model, encode(tokenizer(str(expert)), unseen + [t for t, _ in old], TINY_FIT.max_length)).argmax(-1)]
    assert answers[:2] == [NEW[0], NEW[0]]
    assert np.mean([a == label for a, (_, label) in zip(answers[2:], old)]) > 0.9

    # The student distilled from the new expert knows the label too.
    cfg = load_config(DistillConfig, distill_cfg).model_copy(update={"teacher_dir": expert})
    round_ = run_distill(cfg)
    student = Student.load(Path(cfg.registry_root()) / "tiny" / round_["version"])
    assert NEW[0] in student.labels
    assert [student.labels[i] for i in student.predict(unseen).argmax(-1)] == [NEW[0], NEW[0]]
