import numpy as np
import pytest

from cloud.training.calibration import expected_calibration_error, fit_temperature, softmax


def _sample(rng: np.random.Generator, logits: np.ndarray, temperature: float) -> np.ndarray:
    probs = softmax(logits, temperature)
    return np.array([rng.choice(len(p), p=p) for p in probs])


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_generating_temperature(true_t: float) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(6000, 10))
    labels = _sample(rng, logits, true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Two bins: 0.8 confidence with 80% correct, 0.6 confidence with 60% correct.
    probs = np.array([[0.8, 0.2]] * 10 + [[0.6, 0.4]] * 10)
    labels = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)


def test_ece_measures_overconfidence() -> None:
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 5 + [1] * 5)  # 50% accurate at 0.9 confidence
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, size=(5000, 8))
    labels = _sample(rng, logits, 1.0)
    overconfident = logits * 3
    t = fit_temperature(overconfident, labels)
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, t), labels)
    assert after < before / 3
