import numpy as np
import pytest

from edge.config import PolicyConfig
from edge.policy import (
    BELOW_TARGET_QUANTILE,
    BELOW_THRESHOLD,
    BUDGET_EXHAUSTED,
    CLOUD_ONLY,
    CONFIDENT,
    EDGE_ONLY,
    Policy,
    TokenBucket,
    WindowQuantile,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_threshold_escalates_below_and_keeps_at_or_above() -> None:
    policy = Policy(PolicyConfig(threshold=0.6))
    assert policy.decide(0.59).escalate and policy.decide(0.59).reason == BELOW_THRESHOLD
    assert policy.decide(0.6).reason == CONFIDENT and not policy.decide(0.6).escalate


def test_baseline_modes_ignore_confidence() -> None:
    assert Policy(PolicyConfig(mode="edge_only")).decide(0.01).reason == EDGE_ONLY
    decision = Policy(PolicyConfig(mode="cloud_only")).decide(0.99)
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
    reasons = [policy.decide(0.1).reason for _ in range(3)]
    assert reasons == [CLOUD_ONLY, CLOUD_ONLY, BUDGET_EXHAUSTED]
    assert not policy.decide(0.1).escalate
    clock.now += 1.0
    assert policy.decide(0.1).escalate


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
    decisions = [policy.decide(float(c)) for c in confidences]
    after_warmup = decisions[2000:]
    rate = np.mean([d.escalate for d in after_warmup])
    assert 0.18 < rate < 0.22
    assert {d.reason for d in after_warmup} == {BELOW_TARGET_QUANTILE, CONFIDENT}


def test_target_rate_uses_threshold_until_enough_samples() -> None:
    policy = Policy(PolicyConfig(mode="target_rate", threshold=0.5, min_samples=50, window=100))
    assert policy.decide(0.4).reason == BELOW_THRESHOLD
    assert policy.decide(0.6).reason == CONFIDENT
