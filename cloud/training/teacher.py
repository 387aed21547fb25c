"""`tandem train teacher`: a fine-tune of the base model, saved as a Hugging Face checkpoint
with the base model's tokenizer.

The checkpoint is what the cloud's `classify` expert serves with vLLM's pooling runner.
"""

from pathlib import Path
from typing import Any

from cloud.training.artifact import write_manifest
from cloud.training.base_model import build_classifier, save_tokenizer
from cloud.training.calibration import calibrate, open_accuracy
from cloud.training.config import TrainConfig
from cloud.training.data import load_splits
from cloud.training.loop import fit, predict_logits
from tandem.fsio import atomic_dir


def train_teacher(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    fit_cfg = cfg.teacher
    splits = load_splits(cfg, fit_cfg)
    model = build_classifier(splits.label_names, fit_cfg.layers, fit_cfg.base_model)
    fit(model, splits.train.ids, splits.train.labels, fit_cfg, cfg.seed, desc="teacher")
    calibration = calibrate(predict_logits(model, splits.val.ids), splits.val.labels, splits.label_names,
                            cfg.task.oos_label, cfg.known_rejection)
    test = predict_logits(model, splits.test.ids)
    metrics = {"test_accuracy": float((test.argmax(-1) == splits.test.labels).mean()),
               "test_open_accuracy": open_accuracy(test, splits.test.labels, splits.label_names, calibration)}
    with atomic_dir(out) as scratch:
        model.save_pretrained(scratch)
        save_tokenizer(fit_cfg.base_model, scratch)
        return write_manifest(
            scratch,
            kind="teacher",
            task=cfg.task.name,
            fit=fit_cfg.model_dump(),
            payload="model.safetensors",
            layers=model.config.num_hidden_layers,
            train_examples=len(splits.train.ids),
            label_set_version=cfg.task.label_set_version,
            metrics=metrics,
            **calibration,
        )
