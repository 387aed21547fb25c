"""Audit sampling: weights toward unsure local answers, at the configured budget."""

import random
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from edge.feedback import MIN_AUDIT_WEIGHT, AuditSampler, FeedbackRecorder, top_margin
from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from edge.redact import DEFAULT_PATTERNS, Redactor

ANSWERS = 100_000


def test_top_margin_is_the_gap_between_the_two_most_probable_labels() -> None:
    assert top_margin(np.array([0.1, 0.6, 0.3])) == pytest.approx(0.3)
    assert top_margin(np.array([0.5, 0.5])) == 0.0
    assert top_margin(np.array([1.0])) == 1.0


@pytest.mark.parametrize(("margin", "weight"), [(0.0, 1.0), (0.3, 0.7), (0.9, 0.1), (0.96, MIN_AUDIT_WEIGHT),
                                                (1.0, MIN_AUDIT_WEIGHT)])
def test_margin_weight_is_how_unsure_the_answer_was_with_a_floor(margin: float, weight: float) -> None:
    assert AuditSampler(0.01, "margin").weight(margin) == pytest.approx(weight)
    assert AuditSampler(0.01, "uniform").weight(margin) == 1.0


def _realised(sampler: AuditSampler, margins: np.ndarray) -> np.ndarray:
    return np.array([sampler.due(float(m)) for m in margins])


@pytest.mark.parametrize("weighting", ["margin", "uniform"])
@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_the_realised_rate_is_the_budget_whatever_the_weighting(weighting: str, rate: float) -> None:
    # Margins of a confident student: most near 1, a tail of unsure answers.
    margins = np.random.default_rng(0).beta(4, 1, ANSWERS)
    audited = _realised(AuditSampler(rate, weighting, random.Random(1).random), margins)  # type: ignore[arg-type]
    tolerance = 4 * np.sqrt(rate * (1 - rate) / ANSWERS)  # 4 standard deviations of a binomial share
    assert abs(audited.mean() - rate) < tolerance


def test_unsure_answers_are_sampled_more_often_in_the_ratio_of_their_weights() -> None:
    rate = 0.05
    unsure = np.random.default_rng(2).random(ANSWERS) < 0.5
    margins = np.where(unsure, 0.1, 0.9)  # weights 0.9 and 0.1 (9 to 1), mean 0.5
    audited = _realised(AuditSampler(rate, "margin", random.Random(3).random), margins)
    assert audited.mean() == pytest.approx(rate, abs=0.003)
    # A `rate` share of the samples is uniform, the rest in proportion to the weights.
    expected = (rate + (1 - rate) * 0.9 / 0.5) / (rate + (1 - rate) * 0.1 / 0.5)
    ratio = audited[unsure].mean() / audited[~unsure].mean()
    assert expected == pytest.approx(7.33, abs=0.01)
    assert ratio == pytest.approx(expected, rel=0.15)  # about 600 confident samples: ±4% is one standard deviation


def test_a_rate_of_one_audits_every_answer() -> None:
    sampler = AuditSampler(1.0, "margin", random.Random(5).random)
    assert all(sampler.due(float(m)) for m in np.random.default_rng(6).random(1000))


def test_each_task_keeps_its_own_budget(tmp_path: Path) -> None:
    """A task whose student is always unsure does not take the audits of one that is always sure."""
    outbox = Outbox(tmp_path / "outbox.sqlite3", max_records=10)
    recorder = FeedbackRecorder(outbox, Redactor(DEFAULT_PATTERNS), "dev-1", 0.05, EdgeMetrics(CollectorRegistry()),
                                on_added=lambda: None, chance=random.Random(4).random)
    sure = np.mean([recorder.audit_due("sure", 0.99) for _ in range(20_000)])
    unsure = np.mean([recorder.audit_due("unsure", 0.05) for _ in range(20_000)])
    outbox.close()
    assert sure == pytest.approx(0.05, abs=0.006) and unsure == pytest.approx(0.05, abs=0.006)
