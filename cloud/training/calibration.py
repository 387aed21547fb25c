"""Temperature scaling, the out-of-scope boundary and expected calibration error (numpy only)."""

import math
from typing import Any

import numpy as np

from tandem.contract import OutOfScope
from tandem.open_set import fit_boundary, probabilities


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, lo: float = 0.05, hi: float = 20.0) -> float:
    """The temperature minimising NLL: golden-section search on log T.

    NLL is convex in 1/T, so it is unimodal in log T and the search finds the optimum.
    """
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if nll(logits, labels, math.exp(c)) < nll(logits, labels, math.exp(d)):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, labels: list[str], oos_label: str,
              known_rejection: float) -> dict[str, Any]:
    """The manifest fields that calibrate a classifier on its held-out split: the temperature,
    and the out-of-scope boundary (`tandem.open_set`) fitted on the held-out texts of known
    intents (those not labelled `oos_label`, if the model has that class)."""
    temperature = fit_temperature(val_logits, val_labels)
    known = val_labels != labels.index(oos_label) if oos_label in labels else np.ones(len(val_labels), bool)
    boundary = fit_boundary(val_logits[known] / temperature, oos_label, known_rejection)
    return {"temperature": temperature, "out_of_scope": boundary.model_dump()}


def open_accuracy(logits: np.ndarray, labels: np.ndarray, label_names: list[str], calibration: dict[str, Any]) -> float:
    """Accuracy with the out-of-scope class (`calibrate`'s fields): texts labelled out of scope
    carry its index (`data.load_splits`), and an intent rejected as out of scope is wrong."""
    boundary = OutOfScope.model_validate(calibration["out_of_scope"])
    probs = probabilities(logits / calibration["temperature"], label_names, boundary)
    return float((probs.argmax(-1) == labels).mean())
