import asyncio
import logging
import math
import threading
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from edge.config import EdgeConfig, PolicyConfig
from edge.metrics import EdgeMetrics
from edge.policy import (
    BELOW_RISK_THRESHOLD,
    BELOW_TARGET_QUANTILE,
    BELOW_THRESHOLD,
    BUDGET_EXHAUSTED,
    CLOUD_ONLY,
    CONFIDENT,
    Decision,
    EDGE_ONLY,
    FALLBACK_THRESHOLD,
    RISK_UNCERTIFIED,
    Policy,
    TokenBucket,
    WindowQuantile,
    risk_entry,
)
from edge.runtime import Serving
from edge.service import build_service
from tandem.contract import Manifest, OperatingPoint, RiskThreshold
from tandem.v1 import edge_pb2

# Certified for 2% and 5%; 10% was tested and not certified; 20% certified.
RISK = [RiskThreshold(epsilon=0.02, threshold=0.95), RiskThreshold(epsilon=0.05, threshold=0.8),
        RiskThreshold(epsilon=0.1, threshold=None), RiskThreshold(epsilon=0.2, threshold=0.4)]


def _point(threshold: float, risk: list[RiskThreshold] | None = None) -> OperatingPoint:
    return OperatingPoint(threshold=threshold, objective="escalation_rate", target=0.15, risk=risk or [])


def _manifest(version: str = "v1", point: OperatingPoint | None = None) -> Manifest:
    return Manifest(kind="student", task="t", version=version, created_at=datetime.now(UTC), payload="model.onnx",
                    sha256="0" * 64, temperature=1.0, max_length=16, operating_point=point)


PLAIN = _manifest()  # a student without an operating point, for tests of a pinned threshold


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_threshold_escalates_below_and_keeps_at_or_above() -> None:
    policy = Policy(PolicyConfig(threshold=0.6))
    assert policy.decide(0.59, PLAIN).escalate and policy.decide(0.59, PLAIN).reason == BELOW_THRESHOLD
    assert policy.decide(0.6, PLAIN).reason == CONFIDENT and not policy.decide(0.6, PLAIN).escalate


def test_baseline_modes_ignore_confidence() -> None:
    assert Policy(PolicyConfig(mode="edge_only")).decide(0.01, PLAIN).reason == EDGE_ONLY
    decision = Policy(PolicyConfig(mode="cloud_only")).decide(0.99, PLAIN)
    assert decision.escalate and decision.reason == CLOUD_ONLY


def test_token_bucket_refills_at_rate_and_caps_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token
    assert bucket.try_take() and not bucket.try_take()
    clock.now += 100  # capped at 3
    assert sum(bucket.try_take() for _ in range(10)) == 3


def test_budget_turns_escalations_into_local_answers() -> None:
    clock = FakeClock()
    policy = Policy(PolicyConfig(mode="cloud_only", budget_per_s=1.0, budget_burst=2), clock=clock)
    reasons = [policy.decide(0.1, PLAIN).reason for _ in range(3)]
    assert reasons == [CLOUD_ONLY, CLOUD_ONLY, BUDGET_EXHAUSTED]
    assert not policy.decide(0.1, PLAIN).escalate
    clock.now += 1.0
    assert policy.decide(0.1, PLAIN).escalate


@pytest.mark.parametrize("q", [0.05, 0.2, 0.5, 0.9])
def test_window_quantile_matches_numpy_over_the_last_values(q: float) -> None:
    rng = np.random.default_rng(0)
    values = rng.random(5000)
    window = WindowQuantile(1000)
    for v in values:
        window.add(float(v))
    assert len(window) == 1000
    expected = np.quantile(values[-1000:], q, method="inverted_cdf")
    assert window.quantile(q) == expected


def test_window_quantile_of_empty_window_raises() -> None:
    with pytest.raises(ValueError):
        WindowQuantile(10).quantile(0.5)


def test_target_rate_escalates_that_share_of_traffic() -> None:
    policy = Policy(PolicyConfig(mode="target_rate", target_rate=0.2, window=2000, min_samples=200, threshold=0.0))
    rng = np.random.default_rng(1)
    confidences = rng.beta(5, 2, size=10_000)
    decisions = [policy.decide(float(c), PLAIN) for c in confidences]
    after_warmup = decisions[2000:]
    rate = np.mean([d.escalate for d in after_warmup])
    assert 0.18 < rate < 0.22
    assert {d.reason for d in after_warmup} == {BELOW_TARGET_QUANTILE, CONFIDENT}


def test_target_rate_uses_threshold_until_enough_samples() -> None:
    policy = Policy(PolicyConfig(mode="target_rate", threshold=0.5, min_samples=50, window=100))
    assert policy.decide(0.4, PLAIN).reason == BELOW_THRESHOLD
    assert policy.decide(0.6, PLAIN).reason == CONFIDENT


def test_target_rate_falls_back_to_the_students_own_threshold_until_enough_samples() -> None:
    policy = Policy(PolicyConfig(mode="target_rate", min_samples=50, window=100))
    fitted = _manifest(point=_point(0.8))
    assert policy.decide(0.7, fitted).reason == BELOW_THRESHOLD
    assert policy.decide(0.85, fitted).reason == CONFIDENT


def test_an_unpinned_policy_adopts_each_students_fitted_threshold() -> None:
    adopted: list[float] = []
    policy = Policy(PolicyConfig(), on_threshold=adopted.append)
    v1, v2 = _manifest("v1", _point(0.8)), _manifest("v2", _point(0.6))
    assert policy.decide(0.7, v1) == policy.decide(0.79, v1) == Decision(True, BELOW_THRESHOLD)
    assert policy.decide(0.7, v2) == Decision(False, CONFIDENT) and policy.decide(0.59, v2).escalate
    assert policy.decide(0.7, v1).escalate  # a request the replaced version answered: its threshold
    assert adopted == [0.8, 0.6]  # each adopted once, however many requests it decides


def test_a_pinned_threshold_wins_over_the_students() -> None:
    policy = Policy(PolicyConfig(threshold=0.5))
    assert policy.adopt(_manifest(point=_point(0.9))).threshold == 0.5
    assert policy.decide(0.6, _manifest(point=_point(0.9))) == Decision(False, CONFIDENT)


def test_a_student_without_an_operating_point_gets_the_fallback_with_a_warning_naming_it(
        caplog: pytest.LogCaptureFixture) -> None:
    policy = Policy(PolicyConfig())
    old = _manifest("old-7")
    with caplog.at_level(logging.WARNING, "edge.policy"):
        assert policy.adopt(old).threshold == FALLBACK_THRESHOLD == 0.5
        policy.decide(0.4, old)
        policy.decide(0.6, old)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]  # once, not per request
    assert "t version old-7" in warning.message and "operating_point" in warning.message


@pytest.mark.parametrize(("epsilon", "threshold"), [(0.02, 0.95), (0.03, 0.95), (0.05, 0.8), (0.07, 0.8),
                                                    (0.1, None), (0.15, None), (0.25, 0.4)])
def test_risk_mode_takes_the_entry_of_the_largest_epsilon_within_the_configured_one(
        epsilon: float, threshold: float | None) -> None:
    entry = risk_entry(_point(0.5, RISK), epsilon)
    assert entry is not None and entry.threshold == threshold and entry.epsilon <= epsilon


def test_risk_mode_escalates_below_the_certified_threshold_whatever_the_fitted_one() -> None:
    policy = Policy(PolicyConfig(mode="risk", epsilon=0.07))
    student = _manifest(point=_point(0.3, RISK))
    assert policy.decide(0.79, student) == Decision(True, BELOW_RISK_THRESHOLD)
    assert policy.decide(0.8, student) == Decision(False, CONFIDENT)


@pytest.mark.parametrize(("point", "epsilon"), [(None, 0.05), (_point(0.3, []), 0.05), (_point(0.3, RISK), 0.01),
                                              (_point(0.3, RISK), 0.15)],
                         ids=["no_operating_point", "no_risk_entries", "below_every_entry", "entry_uncertified"])
def test_risk_mode_without_a_certified_threshold_escalates_everything_and_warns_once_per_swap(
        point: OperatingPoint | None, epsilon: float, caplog: pytest.LogCaptureFixture) -> None:
    policy = Policy(PolicyConfig(mode="risk", epsilon=epsilon))
    student, again = _manifest("v1", point), _manifest("v1", point)  # the same version swapped in again
    with caplog.at_level(logging.WARNING, "edge.policy"):
        assert [policy.decide(c, student) for c in (0.2, 0.999, 1.0)] == [Decision(True, RISK_UNCERTIFIED)] * 3
        assert policy.adopt(student).threshold == math.inf
        assert policy.decide(1.0, again) == Decision(True, RISK_UNCERTIFIED)
    assert sum(RISK_UNCERTIFIED in r.message for r in caplog.records if r.levelno == logging.WARNING) == 2


def test_risk_mode_keeps_the_budget() -> None:
    clock = FakeClock()
    policy = Policy(PolicyConfig(mode="risk", epsilon=0.05, budget_per_s=1.0, budget_burst=1), clock=clock)
    assert [policy.decide(0.5, PLAIN).reason for _ in range(2)] == [RISK_UNCERTIFIED, BUDGET_EXHAUSTED]


@pytest.mark.parametrize(("fields", "message"), [
    ({"mode": "risk"}, "policy.epsilon"),
    ({"mode": "risk", "epsilon": 0.05, "threshold": 0.7}, "policy.threshold"),
    ({"mode": "risk", "epsilon": 1.0}, "epsilon"),
    ({"mode": "risk", "epsilon": 0.0}, "epsilon"),
])
def test_risk_mode_config_is_checked(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PolicyConfig(**fields)  # type: ignore[arg-type]


class FakeStudent:
    """Answers `confidence` for its first label; `predict` blocks until `release` is set."""

    def __init__(self, version: str, threshold: float, confidence: float) -> None:
        self.manifest = _manifest(version, _point(threshold))
        self.version = version
        self.labels = ["a", "b"]
        self.out_of_scope = None
        self.confidence = confidence
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def predict(self, texts: list[str]) -> np.ndarray:
        self.entered.set()
        self.release.wait(timeout=30)
        return np.tile([self.confidence, 1 - self.confidence], (len(texts), 1))


async def test_a_swap_adopts_the_new_students_threshold_with_it_and_reports_it() -> None:
    old, new = FakeStudent("v1", threshold=0.9, confidence=0.85), FakeStudent("v2", threshold=0.8, confidence=0.85)
    registry = CollectorRegistry()
    cfg = EdgeConfig(tasks={"t": "/m"}, cloud={"target": "cloud:1", "insecure": True})  # type: ignore[arg-type]
    # No escalator: an escalation is answered locally with the policy's reason.
    service = build_service(cfg, {"t": Serving.start(old, 4, 16)}, EdgeMetrics(registry), None)  # type: ignore[arg-type]
    runtime = service.tasks["t"]

    def infer() -> "asyncio.Future[edge_pb2.InferResponse]":
        return asyncio.ensure_future(service.infer(edge_pb2.InferRequest(task="t", text=b"hello")))

    assert registry.get_sample_value("tandem_edge_threshold", {"task": "t"}) == 0.9  # reported at start
    old.release.clear()
    before = infer()  # answered by the old version, decided after the swap
    await asyncio.to_thread(old.entered.wait, 5)
    await runtime.swap(new, drain_timeout_s=0.05)  # type: ignore[arg-type]
    after = await infer()
    assert (after.model_version, after.reason) == ("v2", CONFIDENT)
    assert registry.get_sample_value("tandem_edge_threshold", {"task": "t"}) == 0.8
    old.release.set()
    answered = await before
    assert (answered.model_version, answered.reason) == ("v1", BELOW_THRESHOLD)  # never v1 at v2's threshold
    await runtime.close()
