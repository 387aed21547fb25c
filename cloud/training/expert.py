"""`tandem train expert`: the classify expert fine-tuned from what the field agreed on.

It starts from the current teacher checkpoint, grows its head by the labels the task file has
gained since (`tandem intents name`), each new row pointing at the mean pooled features of its
examples, and trains briefly at a low learning rate on:

- field labels: CORRECTION records whose (text, label) `corroboration_devices` distinct devices
  sent, and the examples an operator named (`cloud.discovery.field.OPERATOR`). Never ESCALATION
  records: their label is the expert's own answer, and the teacher cannot corroborate itself;
- a replay sample of the task's labelled train split, so that the old labels are not forgotten;
  on it, the current teacher's own distribution over the old labels is distilled as well
  (learning without forgetting, Li & Hoiem 2016): hard labels alone let the old labels drift.

It is gated like the student, on the same held-out validation split: its accuracy may drop at
most `max_accuracy_drop` below the current teacher's, and no label may be significantly worse
(`gate.regressed_labels`). A passing candidate is recalibrated (temperature, out-of-scope
boundary), signed, and published at `<registry>/<task>/experts/<version>/`: the checkpoint
that `tandem cloud rollout-expert` deploys, and the next distillation's `teacher_dir`.
"""

import copy
import logging
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from cloud.audit import AuditLog
from cloud.discovery.field import OPERATOR, normalised
from cloud.training.artifact import write_manifest
from cloud.training.calibration import calibrate, open_accuracy
from cloud.training.config import DistillConfig, ExpertTrainConfig, FitConfig
from cloud.training.data import Splits, load_splits, tokenizer
from cloud.training.distill_data import CORRECTION, FeedbackExample, read_feedback
from cloud.training.loop import Loss, collate, encode, fit_loss, predict_logits
from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from tandem.fsio import atomic_dir
from tandem.signing import manifest_sha256, sign_artifact, signing_key

log = logging.getLogger(__name__)

EXPERTS_DIR = "experts"
PAYLOAD = "model.safetensors"


def run_expert(cfg: DistillConfig, start: Path | None = None,
               feedback: list[FeedbackExample] | None = None) -> dict[str, Any]:
    """One expert round from `start` (default: `cfg.teacher_path()`) and `feedback` (default: the
    task's records in the store). Returns the candidate's version, whether it passed (and was
    published: `path`), its gate, field labels, metrics and the seconds taken."""
    started = time.monotonic()
    expert = cfg.expert
    start = start or cfg.teacher_path()
    task = cfg.task.name
    key = signing_key(cfg.signing_key_path(), cfg.dev_keys)  # before training: a missing key fails fast
    audit = AuditLog(cfg.audit_log_uri())
    fit_cfg = _fit_config(start, expert)
    splits = load_splits(cfg.splits_config(), fit_cfg)
    old = AutoModelForSequenceClassification.from_pretrained(start)
    parent = Manifest.read(start).version if (start / MANIFEST_FILE).is_file() else str(start)
    feedback = read_feedback(cfg.feedback_store_uri(), task) if feedback is None else feedback
    field = field_labels(feedback, splits.label_names, cfg.corroboration_devices)
    ids, labels, replay = training_set(splits, field, fit_cfg.max_length, str(start), expert.replay_per_label, cfg.seed)
    log.info("%s: fine-tuning the expert %s on %d field labels %s and %d replayed examples", task, parent,
             len(field), dict(Counter(field.values())), replay)
    model = grown(old, splits.label_names, ids, labels)
    loss = keep_old_labels(labels, predict_logits(old, ids), expert.kd_weight, expert.kd_temperature)
    fit_loss(model, ids, loss, fit_cfg, cfg.seed, desc="expert")
    val_old, val_new = predict_logits(old, splits.val.ids), predict_logits(model, splits.val.ids)
    gate = judge_expert(val_new, val_old, splits.val.labels, expert)
    lineage = {"parent": parent, "field_labels": dict(Counter(field.values())), "field_sources": _sources(feedback, field),
               "replay_examples": replay, "expert": expert.model_dump(), "seed": cfg.seed,
               "corroboration_devices": cfg.corroboration_devices, "fit": fit_cfg.model_dump()}
    result = {"task": task, "parent": parent, "passed": gate["passed"], "gate": gate, "lineage": lineage,
              "label_set_version": cfg.task.label_set_version}
    if not gate["passed"]:
        audit.append("reject_candidate", "retrainer", task=task, version=None, parent=parent, kind="teacher",
                     reason="the expert's gate did not pass", gate=gate)
        log.warning("%s: the fine-tuned expert failed its gate: %s", task, gate)
        return {**result, "version": None, "path": None, "seconds": round(time.monotonic() - started, 1)}
    path, manifest = publish(cfg, model, start, splits, val_new, lineage, gate, key)
    audit.append("key_use", "retrainer", key_id=manifest.key_id, task=task, version=manifest.version, signed="manifest")
    audit.append("publish", "retrainer", task=task, version=manifest.version, parent=parent, kind="teacher",
                 sequence=manifest.sequence, key_id=manifest.key_id,
                 manifest_sha256=manifest_sha256((path / MANIFEST_FILE).read_bytes()), lineage=lineage, gate=gate)
    log.info("%s: published expert %s at %s", task, manifest.version, path)
    return {**result, "version": manifest.version, "path": str(path),
            "metrics": manifest.model_dump(mode="json")["metrics"], "seconds": round(time.monotonic() - started, 1)}


def field_labels(feedback: list[FeedbackExample], label_names: list[str], min_devices: int) -> dict[str, str]:
    """Text -> label from the field: what an operator named, and corrections whose (text, label)
    `min_devices` distinct devices sent. A text whose agreed labels conflict is left out, and the
    operator's label wins over devices'. Texts compare normalised (case, spacing)."""
    devices: dict[tuple[str, str], set[str]] = defaultdict(set)
    operator: dict[str, str] = {}
    first: dict[str, str] = {}
    known = set(label_names)
    for f in feedback:
        if f.kind != CORRECTION or f.label not in known or not f.device_id or not f.text.strip():
            continue
        key = normalised(f.text)
        first.setdefault(key, f.text)
        if f.device_id == OPERATOR:
            operator[key] = f.label
        else:
            devices[(key, f.label)].add(f.device_id)
    agreed: dict[str, set[str]] = defaultdict(set)
    for (key, label), who in devices.items():
        if len(who) >= min_devices:
            agreed[key].add(label)
    labels = {key: next(iter(ls)) for key, ls in agreed.items() if len(ls) == 1}
    labels.update(operator)
    return {first[key]: label for key, label in labels.items()}


def training_set(splits: Splits, field: dict[str, str], max_length: int, teacher_dir: str, per_label: int,
                 seed: int) -> tuple[list[list[int]], np.ndarray, int]:
    """Token ids and label indices: the field labels whose text is not held out (validation,
    calibration or test), then `per_label` examples of each label from train; and the replay's size."""
    held_out = {normalised(t) for t in splits.val.texts + splits.calib.texts + splits.test.texts}
    texts = [t for t in field if normalised(t) not in held_out]
    index = {name: i for i, name in enumerate(splits.label_names)}
    ids = encode(tokenizer(teacher_dir), texts, max_length)
    labels = [index[field[t]] for t in texts]
    rng = np.random.default_rng(seed)
    replay = []
    for label in np.unique(splits.train.labels):
        rows = np.flatnonzero(splits.train.labels == label)
        replay += rng.choice(rows, min(per_label, len(rows)), replace=False).tolist()
    ids += [splits.train.ids[i] for i in replay]
    labels += [int(splits.train.labels[i]) for i in replay]
    return ids, np.array(labels, dtype=np.int64), len(replay)


def grown(old: BertForSequenceClassification, label_names: list[str], ids: list[list[int]],
          labels: np.ndarray) -> BertForSequenceClassification:
    """A copy of `old` whose head answers `label_names`, which must start with `old`'s labels in
    their order. Each new label's row points from the mean pooled features of all of `ids` to
    the mean of its own examples', as long as the old rows are on average; its bias is their mean."""
    old_labels = [old.config.id2label[i] for i in range(old.config.num_labels)]
    if label_names[: len(old_labels)] != old_labels:
        raise ValueError(f"the task's labels do not extend the teacher's {len(old_labels)} labels in their order: "
                         "labels may only be added, at the end of the task file's labels")
    new = label_names[len(old_labels):]
    missing = [name for i, name in enumerate(new, start=len(old_labels)) if not (labels == i).any()]
    if missing:
        raise ValueError(f"new labels {missing} have no field examples to learn from: name a cluster with them")
    model = copy.deepcopy(old)  # its config too: `old` still answers the gate with its own labels
    if new:
        features = _pooled(old, ids)
        weight, bias = old.classifier.weight.detach(), old.classifier.bias.detach()
        rows = []
        for i in range(len(old_labels), len(label_names)):
            direction = features[labels == i].mean(0) - features.mean(0)
            rows.append(direction / direction.norm().clamp(min=1e-12) * weight.norm(dim=1).mean())
        head = torch.nn.Linear(weight.shape[1], len(label_names))
        with torch.no_grad():
            head.weight.copy_(torch.cat([weight, torch.stack(rows)]))
            head.bias.copy_(torch.cat([bias, bias.mean().repeat(len(new))]))
        model.classifier = head
    model.config.num_labels = len(label_names)
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model.num_labels = len(label_names)
    return model


def keep_old_labels(labels: np.ndarray, old_logits: np.ndarray, weight: float, temperature: float) -> Loss:
    """Cross-entropy on `labels` plus weight·T²·KL(current teacher ‖ model) over the old labels
    (the first `old_logits.shape[1]`), on the examples of old labels only: a new label's texts
    have no old answer worth keeping."""
    targets = torch.as_tensor(labels, dtype=torch.long)
    old = torch.log_softmax(torch.as_tensor(old_logits) / temperature, dim=-1)
    n_old = old_logits.shape[1]
    replayed = targets < n_old

    def loss(output: Any, batch: np.ndarray) -> torch.Tensor:
        logits = output.logits
        ce = torch.nn.functional.cross_entropy(logits, targets[batch])
        keep = replayed[batch]
        if not keep.any() or weight == 0:
            return ce
        new = torch.log_softmax(logits[keep, :n_old] / temperature, dim=-1)
        kl = torch.nn.functional.kl_div(new, old[batch][keep], log_target=True, reduction="batchmean")
        return ce + weight * temperature**2 * kl

    return loss


def judge_expert(candidate: np.ndarray, current: np.ndarray, labels: np.ndarray,
                 cfg: ExpertTrainConfig) -> dict[str, Any]:
    """The gate on the held-out validation split's logits of both (the current teacher's may
    have fewer labels: the new ones are appended, so indices agree)."""
    from cloud.training.gate import regressed_labels

    candidate_ok, current_ok = candidate.argmax(-1) == labels, current.argmax(-1) == labels
    drop = float(current_ok.mean() - candidate_ok.mean())
    regressed = regressed_labels(candidate_ok, current_ok, labels, cfg.regression_alpha)
    return {
        "split": "val",
        "examples": len(labels),
        "candidate_accuracy": float(candidate_ok.mean()),
        "current_accuracy": float(current_ok.mean()),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "regressed_labels": [int(i) for i in regressed],
        # Accuracies are k/n: a drop of exactly the margin must not fail on float rounding.
        "passed": drop <= cfg.max_accuracy_drop + 1e-9 and not regressed,
    }


def publish(cfg: DistillConfig, model: BertForSequenceClassification, start: Path, splits: Splits,
            val_logits: np.ndarray, lineage: dict[str, Any], gate: dict[str, Any], key: Any) -> tuple[Path, Manifest]:
    """Saves, calibrates, signs and publishes the checkpoint (with `start`'s tokenizer files)."""
    calibration = calibrate(val_logits, splits.val.labels, splits.label_names, cfg.task.oos_label, cfg.known_rejection)
    test = predict_logits(model, splits.test.ids)
    metrics = {"test_accuracy": float((test.argmax(-1) == splits.test.labels).mean()),
               "test_open_accuracy": open_accuracy(test, splits.test.labels, splits.label_names, calibration)}
    root = cfg.registry_root() / cfg.task.name / EXPERTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        build = Path(tmp)
        model.save_pretrained(build)
        for f in start.iterdir():  # the tokenizer it was trained with, byte for byte
            if f.is_file() and f.name not in {"config.json", PAYLOAD, MANIFEST_FILE, SIGNATURE_FILE}:
                shutil.copyfile(f, build / f.name)
        write_manifest(build, kind="teacher", task=cfg.task.name, payload=PAYLOAD, sequence=next_sequence(root),
                       layers=model.config.num_hidden_layers, train_examples=len(splits.train.ids),
                       label_set_version=cfg.task.label_set_version, metrics=metrics, gate=gate, **lineage,
                       **calibration)
        manifest = sign_artifact(build, key)
        with atomic_dir(root / manifest.version) as final:
            for f in build.iterdir():
                shutil.copyfile(f, final / f.name)
    return root / manifest.version, manifest


def next_sequence(root: Path) -> int:
    """1 + the highest sequence among the experts published under `root`."""
    return 1 + max((m.sequence for m in _published(root).values()), default=0)


def latest_expert(registry_root: Path, task: str) -> Path | None:
    """The most recently published expert of `task` (highest sequence), or None."""
    published = _published(registry_root / task / EXPERTS_DIR)
    return max(published, key=lambda p: published[p].sequence) if published else None


def _published(root: Path) -> dict[Path, Manifest]:
    if not root.is_dir():
        return {}
    return {p: Manifest.read(p) for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()}


def _fit_config(start: Path, expert: ExpertTrainConfig) -> FitConfig:
    """The teacher's own tokenizer and max_length (from its manifest's fit), the round's rates."""
    fitted = {}
    if (start / MANIFEST_FILE).is_file():
        fitted = Manifest.read(start).model_dump().get("fit") or {}
    return FitConfig(base_model=str(start), max_length=fitted.get("max_length", 64), epochs=expert.epochs, lr=expert.lr,
                     head_lr=expert.head_lr, batch_size=expert.batch_size)


def _sources(feedback: list[FeedbackExample], field: dict[str, str]) -> dict[str, int]:
    """Field labels by where they came from: the operator or corroborating devices."""
    operator = {normalised(f.text) for f in feedback if f.kind == CORRECTION and f.device_id == OPERATOR}
    named = sum(1 for t in field if normalised(t) in operator)
    return {"operator": named, "devices": len(field) - named}


@torch.inference_mode()
def _pooled(model: BertForSequenceClassification, ids: list[list[int]], batch_size: int = 128) -> torch.Tensor:
    """The pooler's output (what the head reads) for each sequence."""
    model.eval()
    out = []
    for start in range(0, len(ids), batch_size):
        input_ids, mask = collate(ids[start: start + batch_size])
        out.append(model.bert(input_ids=input_ids, attention_mask=mask).pooler_output)
    return torch.cat(out)
