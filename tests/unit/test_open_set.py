"""The out-of-scope boundary, on data whose truth is known: Gaussian intents in a plane, a
nearest-mean classifier's logits, and points far from every intent."""

import numpy as np
import pytest

from tandem.contract import OutOfScope
from tandem.open_set import answer_labels, fit_boundary, probabilities

MEANS = np.array([[0.0, 6.0], [6.0, 0.0], [-6.0, 0.0]])


def _logits(points: np.ndarray) -> np.ndarray:
    """A nearest-mean classifier: minus the squared distance to each intent's mean."""
    return -((points[:, None, :] - MEANS[None]) ** 2).sum(-1) / 4


def _intents(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(MEANS), n)
    return MEANS[labels] + rng.normal(size=(n, 2)), labels


def test_the_boundary_rejects_its_share_of_known_texts_and_catches_the_far_ones() -> None:
    rng = np.random.default_rng(0)
    val, _ = _intents(rng, 2000)
    boundary = fit_boundary(_logits(val), "oos", 0.05)
    test, truth = _intents(rng, 2000)
    far = rng.normal(size=(500, 2)) * 2 + np.array([0.0, -9.0])  # an intent no one trained
    labels = answer_labels(["a", "b", "c"], boundary)
    known = probabilities(_logits(test), ["a", "b", "c"], boundary).argmax(-1)
    unknown = probabilities(_logits(far), ["a", "b", "c"], boundary).argmax(-1)
    assert labels == ["a", "b", "c", "oos"]
    assert np.mean(known == 3) == pytest.approx(0.05, abs=0.02)
    assert np.mean(known[known != 3] == truth[known != 3]) > 0.99
    assert np.mean(unknown == 3) > 0.95


def test_probabilities_sum_to_one_and_without_a_boundary_are_the_softmax() -> None:
    logits = np.array([[2.0, 1.0, -1.0]])
    closed = probabilities(logits, ["a", "b", "c"], None)
    assert closed.sum() == pytest.approx(1.0) and closed.argmax() == 0
    assert closed[0, 0] / closed[0, 1] == pytest.approx(np.e)
    opened = probabilities(logits, ["a", "b", "c"], OutOfScope(label="oos", logit=5.0, known_rejection=0.05))
    assert opened.shape == (1, 4) and opened.sum() == pytest.approx(1.0) and opened.argmax() == 3
    # Relative odds between intents are unchanged by the extra class.
    assert opened[0, 0] / opened[0, 1] == pytest.approx(np.e)


def test_a_model_class_of_the_same_label_takes_the_boundary_mass() -> None:
    boundary = OutOfScope(label="oos", logit=0.0, known_rejection=0.05)
    labels = ["greet", "oos"]
    p = probabilities(np.array([[0.0, 0.0]]), labels, boundary)
    assert answer_labels(labels, boundary) == labels
    assert p.shape == (1, 2) and p[0, 1] == pytest.approx(2 / 3)
