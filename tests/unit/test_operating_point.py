"""A student's operating point: the fitted threshold for each objective, and the
risk-controlled thresholds' bound on synthetic data whose true risk is known exactly."""

import math

import numpy as np
import pytest

from cloud.training.config import OperatingPointConfig
from cloud.training.operating_point import (binomial_cdf, escalation_rate_for_target, fit_operating_point,
                                            risk_thresholds)
from tandem.contract import OperatingPoint

CALIB = (np.linspace(0.5, 1.0, 100, dtype=np.float32), np.ones(100, bool))


def _fit(confidence: np.ndarray, student_ok: np.ndarray, expert_ok: np.ndarray, **cfg: object) -> OperatingPoint:
    return fit_operating_point(confidence, student_ok, expert_ok, *CALIB, OperatingPointConfig(**cfg))


def test_escalation_rate_objective_escalates_that_share_least_confident_first() -> None:
    confidence = np.arange(100, dtype=np.float32)[::-1] / 100  # 0.99 .. 0.00
    point = _fit(confidence, np.ones(100, bool), np.ones(100, bool), objective="escalation_rate", escalation_rate=0.15)
    assert point.threshold == np.float32(0.15) and point.target == 0.15
    assert point.fitted["escalation_rate"] == 0.15 and point.fitted["examples"] == 100
    assert (confidence < point.threshold).sum() == 15


def test_escalation_rate_objective_with_ties_takes_the_closest_share() -> None:
    confidence = np.repeat(np.float32([0.2, 0.4, 0.6, 0.8]), 25)  # only 0, 25, 50, 75 or 100% can escalate
    point = _fit(confidence, np.ones(100, bool), np.ones(100, bool), objective="escalation_rate", escalation_rate=0.3)
    assert point.threshold == np.float32(0.4) and point.fitted["escalation_rate"] == 0.25


def test_cascade_accuracy_objective_escalates_just_enough_to_reach_the_expert() -> None:
    confidence = np.linspace(0, 1, 100, dtype=np.float32)
    student_ok = np.arange(100) >= 20  # wrong on the 20 least confident texts
    expert_ok = ~np.isin(np.arange(100), range(50, 55))  # 95%: wrong on 5 the student gets right
    point = _fit(confidence, student_ok, expert_ok, objective="cascade_accuracy", accuracy_below_expert=0.0)
    assert point.target == pytest.approx(0.95) and point.threshold == confidence[15]
    assert point.fitted == pytest.approx({"escalation_rate": 0.15, "cascade_accuracy": 0.95, "expert_accuracy": 0.95,
                                          "student_accuracy": 0.80, "examples": 100})
    looser = _fit(confidence, student_ok, expert_ok, objective="cascade_accuracy", accuracy_below_expert=0.05)
    assert looser.threshold == confidence[10] and looser.fitted["escalation_rate"] == 0.10


@pytest.mark.parametrize("seed", range(3))
def test_the_fitted_threshold_reproduces_its_rate_in_float32_float64_and_through_json(seed: int) -> None:
    rng = np.random.default_rng(seed)
    confidence = rng.beta(5, 1, 1000).astype(np.float32)
    student_ok = rng.random(1000) < confidence
    expert_ok = rng.random(1000) < 0.93
    point = _fit(confidence, student_ok, expert_ok, objective="cascade_accuracy", accuracy_below_expert=0.01)
    assert point.fitted["escalation_rate"] == escalation_rate_for_target(confidence, student_ok, expert_ok, 0.01)
    shipped = OperatingPoint.model_validate_json(point.model_dump_json()).threshold
    assert shipped == point.threshold
    for escalate in (confidence < shipped, confidence.astype(np.float64) < shipped, confidence < np.float32(shipped)):
        assert escalate.mean() == point.fitted["escalation_rate"]


def test_mismatched_inputs_name_their_lengths() -> None:
    with pytest.raises(ValueError, match="student_ok"):
        _fit(np.ones(3, np.float32), np.ones(2, bool), np.ones(3, bool))


def _true_risk(threshold: float) -> float:
    """P(wrong | confidence >= t) when confidence ~ U(0, 1) and P(wrong | c) = (1 - c)² / 2."""
    return (1 - threshold) ** 2 / 6


def _draw(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    confidence = rng.random(n).astype(np.float32)
    return confidence, rng.random(n) >= (1 - confidence) ** 2 / 2


def test_the_risk_bound_holds_in_all_but_about_delta_of_calibrations() -> None:
    """200 calibration splits of 1,000 draws each; the error among kept answers at a certified
    threshold is the model's exact risk there (a fresh sample of infinite size). It may exceed
    epsilon in at most delta = 5% of the splits; 10% allows for 200 trials' noise."""
    rng = np.random.default_rng(0)
    epsilons, delta = [0.02, 0.05, 0.1], 0.05
    thresholds = np.array([[r.threshold for r in risk_thresholds(*_draw(rng, 1000), epsilons, delta)]
                           for _ in range(200)], dtype=float)  # None -> nan: every answer escalates, no error
    for j, epsilon in enumerate(epsilons):
        certified = thresholds[~np.isnan(thresholds[:, j]), j]
        assert np.sum(_true_risk(certified) > epsilon) <= 2 * delta * len(thresholds)
    # Not vacuous where 1,000 draws suffice: close to the lowest threshold the truth allows.
    for j, epsilon in [(1, 0.05), (2, 0.1)]:
        lowest = 1 - math.sqrt(6 * epsilon)  # _true_risk(lowest) == epsilon
        assert np.isnan(thresholds[:, j]).mean() < 0.1
        assert lowest < np.nanmedian(thresholds[:, j]) < lowest + 0.15
    # A larger epsilon never certifies a higher threshold.
    assert (np.diff(np.nan_to_num(thresholds, nan=2.0), axis=1) <= 0).all()  # None: above any threshold


def test_thresholds_fall_as_epsilon_grows() -> None:
    risk = risk_thresholds(*_draw(np.random.default_rng(1), 1000), [0.05, 0.1, 0.2, 0.3], 0.05)
    values = [r.threshold for r in risk]
    assert [r.epsilon for r in risk] == [0.05, 0.1, 0.2, 0.3]
    assert None not in values and values == sorted(values, reverse=True) and values[0] > values[-1]


def test_all_wrong_certifies_nothing() -> None:
    confidence = np.linspace(0, 1, 1000, dtype=np.float32)
    assert [r.threshold for r in risk_thresholds(confidence, np.zeros(1000, bool), [0.05, 0.5], 0.05)] == [None, None]


def test_a_calibration_set_too_small_to_certify_gets_none() -> None:
    # Even with no error, fewer than log(0.05) / log(0.95) = 58.4 answers cannot show an error <= 5%.
    confidence = np.linspace(0.5, 1, 58, dtype=np.float32)
    assert risk_thresholds(confidence, np.ones(58, bool), [0.05], 0.05)[0].threshold is None


def test_flawless_answers_certify_keeping_all_once_there_are_enough() -> None:
    confidence = np.linspace(0.5, 1, 59, dtype=np.float32)
    assert risk_thresholds(confidence, np.ones(59, bool), [0.05], 0.05)[0].threshold == np.float32(0.5)


@pytest.mark.parametrize("n, p", [(1, 0.3), (13, 0.5), (60, 0.05), (200, 0.01)])
def test_binomial_cdf_matches_the_exact_sum(n: int, p: float) -> None:
    for k in range(-1, n + 2):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k + 1, 0)) if i <= n)
        assert binomial_cdf(k, n, p) == pytest.approx(min(exact, 1.0), rel=1e-9, abs=1e-300)


def test_binomial_cdf_does_not_underflow_on_large_sets() -> None:
    assert 0 < binomial_cdf(10, 5000, 0.05) < 1e-90
    # The exact sum, in rationals: sum(comb(5000, i) * Fraction(1, 20)**i * Fraction(19, 20)**(5000 - i), i <= 250).
    assert binomial_cdf(250, 5000, 0.05) == pytest.approx(0.5168178196478086, rel=1e-9)
