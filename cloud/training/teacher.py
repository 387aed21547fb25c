"""`tandem train teacher`: full MiniLM-L6 fine-tune, saved as a Hugging Face checkpoint.

The checkpoint is what the cloud's `classify` expert serves with vLLM's pooling runner.
"""

import shutil
from pathlib import Path
from typing import Any

from cloud.training.artifact import write_manifest
from cloud.training.base_model import TOKENIZER_FILES, build_classifier, minilm_dir
from cloud.training.config import TrainConfig
from cloud.training.data import load_splits
from cloud.training.loop import fit, predict_logits
from tandem.fsio import atomic_dir


def train_teacher(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    fit_cfg = cfg.teacher
    splits = load_splits(cfg, fit_cfg)
    model = build_classifier(splits.label_names, fit_cfg.layers)
    fit(model, splits.train.ids, splits.train.labels, fit_cfg, cfg.seed, desc="teacher")
    accuracy = float((predict_logits(model, splits.test.ids).argmax(-1) == splits.test.labels).mean())
    with atomic_dir(out) as scratch:
        model.save_pretrained(scratch)
        for name in TOKENIZER_FILES:
            shutil.copy(minilm_dir() / name, scratch / name)
        return write_manifest(
            scratch,
            kind="teacher",
            task=cfg.task.name,
            fit=fit_cfg.model_dump(),
            payload="model.safetensors",
            layers=model.config.num_hidden_layers,
            train_examples=len(splits.train.ids),
            metrics={"test_accuracy": accuracy},
        )
