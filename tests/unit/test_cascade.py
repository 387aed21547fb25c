"""Cascade accuracy arithmetic against a brute-force replay."""

import numpy as np
import pytest

from cloud.training.operating_point import cascade_accuracy, escalation_rate_for_target


def _brute_force(confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray, tolerance: float) -> float:
    order = np.argsort(confidence, kind="stable")
    for k in range(len(confidence) + 1):
        answered_by_expert = np.zeros(len(confidence), bool)
        answered_by_expert[order[:k]] = True
        if np.where(answered_by_expert, expert_ok, student_ok).mean() >= expert_ok.mean() - tolerance - 1e-12:
            return k / len(confidence)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(5))
def test_escalation_rate_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    confidence = rng.random(300)
    student_ok = rng.random(300) < confidence  # confident answers are more often right
    expert_ok = rng.random(300) < 0.92
    for tolerance in (0.0, 0.01, 0.05):
        assert escalation_rate_for_target(confidence, student_ok, expert_ok, tolerance) == _brute_force(
            confidence, student_ok, expert_ok, tolerance
        )


def test_a_student_as_good_as_the_expert_escalates_nothing() -> None:
    ok = np.array([True, True, False, True])
    assert escalation_rate_for_target(np.array([0.9, 0.8, 0.3, 0.7]), ok, ok) == 0.0


def test_a_useless_student_escalates_until_the_target() -> None:
    confidence = np.linspace(0, 1, 100)
    student_ok = np.zeros(100, bool)
    expert_ok = np.ones(100, bool)
    # Target 99%: 99 of the 100 queries must reach the expert.
    assert escalation_rate_for_target(confidence, student_ok, expert_ok, 0.01) == pytest.approx(0.99)


def test_cascade_accuracy_at_a_threshold() -> None:
    confidence = np.array([0.2, 0.6, 0.9, 0.95])
    student_ok = np.array([False, True, True, False])
    expert_ok = np.array([True, False, True, True])
    accuracy, rate = cascade_accuracy(confidence, student_ok, expert_ok, threshold=0.7)
    assert rate == 0.5
    assert accuracy == 0.5  # expert: right, wrong; student: right, wrong
