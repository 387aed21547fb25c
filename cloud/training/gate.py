"""The promotion gate: a candidate replaces the promoted student only if it is measurably better."""

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from cloud.training.data import Split
from cloud.training.export import onnx_logits
from cloud.training.loop import encode
from tandem.contract import LABELS_FILE, MODEL_FILE, TOKENIZER_FILE, Manifest


def onnx_accuracy(directory: Path, split: Split, label_names: list[str], max_length: int) -> float:
    """Accuracy of an artifact's model on `split`, compared by label name, so that an
    artifact with another label order is still judged fairly. The texts are encoded with the
    artifact's own tokenizer, `max_length` tokens each: a new base model brings a new one."""
    ids = encode(Tokenizer.from_file(str(directory / TOKENIZER_FILE)), split.texts, max_length)
    predicted = onnx_logits(directory / MODEL_FILE, ids).argmax(-1)
    own = json.loads((directory / LABELS_FILE).read_text())
    return float(np.mean([own[p] == label_names[t] for p, t in zip(predicted, split.labels)]))


def passes(candidate: float, promoted: float | None, min_gain: float) -> bool:
    """With nothing promoted, a candidate that loads and answers passes."""
    # Accuracies are k/n: a gain of exactly min_gain must not fail on float rounding.
    return promoted is None or candidate - promoted >= min_gain - 1e-9


def judge(
    candidate: Path, promoted: Path | None, val: Split, label_names: list[str], min_gain: float, max_length: int
) -> dict[str, Any]:
    """Measures both artifacts on the held-out validation split now, rather than trusting a
    stored number that may come from another split; returns the comparison for the manifest.
    `max_length`: the candidate's (the promoted version's is in its manifest)."""
    candidate_accuracy = onnx_accuracy(candidate, val, label_names, max_length)
    promoted_accuracy = None if promoted is None else onnx_accuracy(
        promoted, val, label_names, Manifest.read(promoted).max_length or max_length)
    return {
        "split": "val",
        "examples": len(val.ids),
        "candidate_accuracy": candidate_accuracy,
        "promoted_accuracy": promoted_accuracy,
        "min_accuracy_gain": min_gain,
        "passed": passes(candidate_accuracy, promoted_accuracy, min_gain),
    }
