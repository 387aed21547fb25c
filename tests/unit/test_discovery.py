"""New intents from the field: clustering out-of-scope texts, the device threshold, the task
file's label addition, naming a cluster into the feedback store and the audit log; and the
expert round's pure logic: its field labels, gate, grown head and anti-forgetting loss."""

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud.audit.log import AuditLog
from cloud.discovery.clusters import Cluster, DiscoveryConfig, FieldText, agglomerate, find_clusters, rank
from cloud.discovery.field import OPERATOR, out_of_scope_texts
from cloud.discovery.naming import add_label, name_cluster
from cloud.feedback import FeedbackStore
from cloud.training.distill_data import read_feedback
from cloud.training.expert import field_labels
from tandem.settings import ConfigError
from tandem.tasks import Task
from tandem.v1 import common_pb2, fleet_pb2


def _blobs(sizes: list[int], seed: int = 0, dim: int = 32, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised points around len(sizes) random directions, and which direction each is of."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    truth = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True) + noise * rng.normal(size=(len(truth), dim))
    return points / np.linalg.norm(points, axis=1, keepdims=True), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all(len(set(b[a == k])) == 1 for k in set(a)) and all(len(set(a[b == k])) == 1 for k in set(b))


def test_agglomerate_recovers_known_clusters() -> None:
    vectors, truth = _blobs([12, 7, 20, 5])
    assert _same_partition(agglomerate(vectors, 0.5), truth)


def test_agglomerate_keeps_dissimilar_texts_apart_and_merges_everything_at_a_low_bar() -> None:
    vectors, _ = _blobs([6, 6, 6])
    assert len(set(agglomerate(vectors, 0.999))) == 18
    assert set(agglomerate(vectors, -0.99)) == {0}


def _texts(truth: np.ndarray, devices: dict[int, list[str]]) -> list[FieldText]:
    """Text i of cluster k sent by devices[k][i % len(devices[k])]."""
    counts: dict[int, int] = {}
    out = []
    for k in truth:
        i = counts[k] = counts.get(k, -1) + 1
        out.append(FieldText(f"intent {k} text {i}", frozenset({devices[k][i % len(devices[k])]})))
    return out


def test_a_cluster_needs_enough_distinct_devices_each_counted_once() -> None:
    vectors, truth = _blobs([10, 10, 10])
    # Cluster 0: 10 texts from one device (a poisoner's, however many it sends); 1: two devices; 2: three.
    texts = _texts(truth, {0: ["mallory"], 1: ["a", "b"], 2: ["a", "b", "c"]})
    shown = rank(texts, vectors, DiscoveryConfig(), min_devices=3)
    assert [(c.size, c.devices) for c in shown] == [(10, 3)]
    assert all(t.startswith("intent 2") for t in shown[0].texts)
    assert [c.devices for c in rank(texts, vectors, DiscoveryConfig(), min_devices=2)] == [3, 2]
    assert rank(texts, vectors, DiscoveryConfig(), min_devices=4) == []


def test_clusters_are_ranked_and_small_ones_hidden() -> None:
    vectors, truth = _blobs([4, 9, 2])
    texts = _texts(truth, {0: ["a", "b"], 1: ["a", "b"], 2: ["a", "b"]})
    shown = rank(texts, vectors, DiscoveryConfig(min_size=3), min_devices=2)
    assert [c.size for c in shown] == [9, 4]  # the 2-text cluster is below min_size
    assert shown[0].cohesion > 0.5 and shown[0].id.startswith("c-")


class _Lookup:
    """A fake embedder (pure logic): each text's row in a fixed table."""

    fingerprint = "lookup"

    def __init__(self, texts: list[FieldText], vectors: np.ndarray) -> None:
        self._rows = {t.text: v for t, v in zip(texts, vectors)}

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._rows[t] for t in texts])


def test_clusters_and_their_ids_do_not_depend_on_the_order_texts_arrive_in() -> None:
    vectors, truth = _blobs([8, 8, 8], seed=3)
    texts = _texts(truth, {k: ["a", "b", "c"] for k in range(3)})
    embedder = _Lookup(texts, vectors)
    order = np.random.default_rng(1).permutation(len(texts))
    first = find_clusters(texts, embedder, DiscoveryConfig(), 3)
    again = find_clusters([texts[i] for i in order], embedder, DiscoveryConfig(), 3)
    assert first == again and len(first) == 3


TASK_FILE = """\
# A bank's intents (comments stay).
name: bank
label_set_version: 2   # raise it when labels are added
train: {train}
test: {test}
labels:                 # label -> description
  balance: the account's balance
  transfer: sending money
# out_of_scope: the reserved one
attribution: made up
"""


@pytest.fixture()
def task_file(tmp_path: Path) -> Path:
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("text,label\nwhat is my balance,balance\nsend money,transfer\n")
    path = tmp_path / "bank.yaml"
    path.write_text(TASK_FILE.format(train=tmp_path / "train.csv", test=tmp_path / "test.csv"))
    return path


def test_add_label_appends_to_the_mapping_raises_the_version_and_keeps_comments(task_file: Path) -> None:
    task = add_label(task_file, "card_frozen?", "the card: frozen, or: blocked")
    assert task.label_names() == ["balance", "transfer", "card_frozen?", "out_of_scope"]
    assert task.label_set_version == 3 and task.descriptions()["card_frozen?"] == "the card: frozen, or: blocked"
    text = task_file.read_text()
    assert "# A bank's intents (comments stay)." in text and "label_set_version: 3   # raise it" in text
    assert "# out_of_scope: the reserved one" in text and "attribution: made up" in text
    assert Task.from_file(task_file) == task


@pytest.mark.parametrize("label", ["balance", "out_of_scope", " padded", ""])
def test_add_label_refuses_an_existing_or_invalid_label_and_leaves_the_file(task_file: Path, label: str) -> None:
    before = task_file.read_text()
    with pytest.raises(ConfigError, match="label"):
        add_label(task_file, label, "")
    assert task_file.read_text() == before


def test_add_label_to_a_task_without_a_label_set_declares_trains_labels_first(tmp_path: Path, task_file: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(f"name: plain\ntrain: {tmp_path / 'train.csv'}\ntest: {tmp_path / 'test.csv'}\n")
    task = add_label(path, "new_one", "something new")
    assert task.label_names() == ["balance", "transfer", "new_one", "out_of_scope"] and task.label_set_version == 2


def test_add_label_refuses_a_list_of_labels(tmp_path: Path, task_file: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump({"name": "l", "train": str(tmp_path / "train.csv"), "test": "t.csv",
                                    "labels": ["balance", "transfer"]}, default_flow_style=False))
    with pytest.raises(ConfigError, match="mapping"):
        add_label(path, "new_one", "")


def _record(kind: int, text: str, device: str, label: str = "", edge_label: str = "") -> fleet_pb2.FeedbackRecord:
    return fleet_pb2.FeedbackRecord(
        record_id=f"{device}-{kind}-{text}".replace(" ", "_"), request_id="r", task="bank", kind=kind, text=text,
        label=label, edge=common_pb2.EdgePrediction(label=edge_label, confidence=0.5), device_id=device,
        created_unix_ms=int(time.time() * 1000), label_set_version=2)


def test_naming_a_cluster_stores_its_texts_as_the_operators_labels_and_audits_it(tmp_path: Path, task_file: Path) -> None:
    store = str(tmp_path / "feedback")
    FeedbackStore(store).add([
        _record(fleet_pb2.ESCALATION, "my card is frozen", "d1", label="out_of_scope"),
        _record(fleet_pb2.FALLBACK, "My  card is FROZEN", "d2", edge_label="out_of_scope"),  # the same text
        _record(fleet_pb2.AUDIT, "card frozen again", "d3", edge_label="out_of_scope"),
        _record(fleet_pb2.AUDIT, "what is my balance now", "d3", edge_label="balance"),  # in scope
        _record(fleet_pb2.ESCALATION, "send money please", "d1", label="transfer"),
    ])
    task = Task.from_file(task_file)
    found = out_of_scope_texts(store, task)
    assert [(t.text, sorted(t.devices)) for t in found] == [("my card is frozen", ["d1", "d2"]),
                                                            ("card frozen again", ["d3"])]
    cluster = Cluster("c-1", tuple(t.text for t in found), 3, 0.9)
    audit = str(tmp_path / "audit")
    result = name_cluster(task_file, cluster, "card_frozen", "the card is frozen", store, audit)
    assert result["new_label"] and result["label_set_version"] == 3 and result["stored"] == 2
    assert Task.from_file(task_file).label_names()[-2] == "card_frozen"
    named = [f for f in read_feedback(store, "bank") if f.device_id == OPERATOR]
    assert sorted((f.kind, f.text, f.label) for f in named) == [("CORRECTION", "card frozen again", "card_frozen"),
                                                                ("CORRECTION", "my card is frozen", "card_frozen")]
    assert out_of_scope_texts(store, Task.from_file(task_file)) == []  # named texts are not shown again
    entry = AuditLog(audit).entries()[-1]
    assert (entry["event"], entry["actor"], entry["data"]["label"]) == ("name_label", "operator", "card_frozen")
    # Naming again, into the label it now has: no new version, and the same texts are not stored twice.
    again = name_cluster(task_file, cluster, "card_frozen", "", store, audit)
    assert not again["new_label"] and again["label_set_version"] == 3 and again["stored"] == 0


def test_the_experts_field_labels_are_the_operators_and_what_enough_devices_agree_on() -> None:
    from cloud.training.distill_data import FeedbackExample as F

    labels = ["balance", "transfer", "card_frozen"]
    feedback = [
        F("CORRECTION", "frozen card", "card_frozen", OPERATOR),
        F("CORRECTION", "send it", "transfer", "d1"), F("CORRECTION", "Send  it", "transfer", "d2"),
        F("CORRECTION", "send it", "transfer", "d2"),  # a device counts once
        F("CORRECTION", "how much", "balance", "d1"), F("CORRECTION", "how much", "balance", "d2"),
        F("CORRECTION", "how much", "balance", "d3"),
        F("ESCALATION", "my balance", "balance", "d1"), F("ESCALATION", "my balance", "balance", "d2"),
        F("ESCALATION", "my balance", "balance", "d3"),  # the expert's own answers: never its training labels
        F("CORRECTION", "both", "balance", "d1"), F("CORRECTION", "both", "balance", "d2"),
        F("CORRECTION", "both", "transfer", "d3"), F("CORRECTION", "both", "transfer", "d4"),  # conflicting
        F("CORRECTION", "unknown label", "nope", OPERATOR),
    ]
    assert field_labels(feedback, labels, 2) == {"frozen card": "card_frozen", "send it": "transfer",
                                                 "how much": "balance"}
    assert field_labels(feedback, labels, 3) == {"frozen card": "card_frozen", "how much": "balance"}


def _logits(answers: list[int], n_labels: int) -> np.ndarray:
    out = np.zeros((len(answers), n_labels))
    out[np.arange(len(answers)), answers] = 1.0
    return out


def test_the_experts_gate_refuses_an_accuracy_drop_beyond_the_margin_and_a_regressed_label() -> None:
    from cloud.training.config import ExpertTrainConfig
    from cloud.training.expert import judge_expert

    labels = np.repeat(np.arange(4), 10)
    current = _logits(labels.tolist(), 4)  # all right
    cfg = ExpertTrainConfig(max_accuracy_drop=0.05)
    one_wrong = labels.copy()
    one_wrong[0] = 1
    assert judge_expert(_logits(one_wrong.tolist(), 5), current, labels, cfg)["passed"]  # 2.5 points, spread
    two_wrong = one_wrong.copy()
    two_wrong[15] = 0
    assert judge_expert(_logits(two_wrong.tolist(), 5), current, labels, cfg)["passed"]
    label_lost = labels.copy()
    label_lost[30:36] = 4  # label 3 loses 6 of its 10 texts to the new label 4
    gate = judge_expert(_logits(label_lost.tolist(), 5), current, labels, ExpertTrainConfig(max_accuracy_drop=0.2))
    assert not gate["passed"] and gate["regressed_labels"] == [3]
    three_wrong = two_wrong.copy()
    three_wrong[25] = 0
    assert not judge_expert(_logits(three_wrong.tolist(), 5), current, labels, cfg)["passed"]  # 7.5 points


def test_the_grown_head_keeps_the_old_rows_and_adds_one_per_new_label() -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from cloud.training.expert import grown

    torch.manual_seed(0)
    old = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
        num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1})).eval()
    ids = [[1, 5, 6, 2], [1, 7, 2], [1, 9, 9, 9, 2], [1, 11, 2]]
    model = grown(old, ["a", "b", "c"], ids, np.array([0, 1, 2, 2]))
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"} and old.config.num_labels == 2
    assert torch.equal(model.classifier.weight[:2], old.classifier.weight)
    assert model.classifier.weight.shape == (3, 32)
    with pytest.raises(ValueError, match="extend"):
        grown(old, ["b", "a", "c"], ids, np.array([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="no field examples"):
        grown(old, ["a", "b", "c"], ids, np.array([0, 1, 1, 1]))


def test_the_replayed_examples_keep_the_current_teachers_answers_and_new_labels_learn_from_theirs_alone() -> None:
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    from cloud.training.expert import keep_old_labels

    old = np.array([[2.0, -1.0], [0.5, 1.5], [3.0, 0.0]], dtype=np.float32)
    labels = np.array([0, 1, 2])  # the third is the new label's: no old answer to keep
    loss = keep_old_labels(labels, old, weight=1.0, temperature=2.0)
    batch = np.arange(3)
    same = torch.tensor(np.c_[old, [0.0, 0.0, 9.0]])
    ce = torch.nn.functional.cross_entropy(same, torch.tensor(labels))
    assert torch.isclose(loss(SequenceClassifierOutput(logits=same), batch), ce)  # KL 0: the old rows agree
    drifted = same.clone()
    drifted[0, :2] = torch.tensor([-1.0, 2.0])
    moved_new_row = same.clone()
    moved_new_row[2, :2] = torch.tensor([-5.0, 5.0])
    assert loss(SequenceClassifierOutput(logits=drifted), batch) > torch.nn.functional.cross_entropy(
        drifted, torch.tensor(labels))
    assert torch.isclose(loss(SequenceClassifierOutput(logits=moved_new_row), batch),
                         torch.nn.functional.cross_entropy(moved_new_row, torch.tensor(labels)))
