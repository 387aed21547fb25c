"""The circuit breaker's states, with a scripted escalator and a clock the test moves."""

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from edge.breaker import OPEN_REASON, CircuitBreaker, State
from edge.config import BreakerConfig
from edge.errors import CloudCallError
from edge.metrics import EdgeMetrics
from tandem.v1 import expert_pb2

REQUEST = expert_pb2.EscalateRequest(request_id="r", task="t", text="hi")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedEscalator:
    """Raises the scripted status for each call (None answers); counts calls."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode | None] = []
        self.calls = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def escalate(self, request: expert_pb2.EscalateRequest) -> expert_pb2.EscalateResponse:
        self.calls += 1
        await self.hold.wait()
        code = self.script.pop(0) if self.script else None
        if code is not None:
            raise CloudCallError(code, "scripted")
        return expert_pb2.EscalateResponse(request_id=request.request_id, label="ok")


def _breaker(threshold: int = 2, open_s: float = 10) -> tuple[CircuitBreaker, ScriptedEscalator, Clock, CollectorRegistry]:
    registry, clock, cloud = CollectorRegistry(), Clock(), ScriptedEscalator()
    breaker = CircuitBreaker(cloud, BreakerConfig(failure_threshold=threshold, open_s=open_s), EdgeMetrics(registry), clock)
    return breaker, cloud, clock, registry


async def _outcome(breaker: CircuitBreaker) -> str:
    try:
        return (await breaker.escalate(REQUEST)).label
    except CloudCallError as exc:
        return exc.reason


async def test_opens_after_consecutive_not_answering_failures_and_answers_without_calling() -> None:
    breaker, cloud, _, registry = _breaker(threshold=3)
    cloud.script = [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    outcomes = [await _outcome(breaker) for _ in range(5)]
    assert outcomes == ["cloud_deadline_exceeded", "cloud_unavailable", "cloud_resource_exhausted", OPEN_REASON, OPEN_REASON]
    assert cloud.calls == 3 and breaker.state == State.OPEN
    assert registry.get_sample_value("tandem_edge_cloud_breaker_state") == State.OPEN
    assert registry.get_sample_value("tandem_edge_cloud_breaker_transitions_total", {"to": "open"}) == 1


async def test_an_answer_or_an_error_from_a_cloud_that_answered_resets_the_count() -> None:
    breaker, cloud, _, _ = _breaker(threshold=2)
    cloud.script = [grpc.StatusCode.UNAVAILABLE, None, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.UNAVAILABLE]
    for _ in range(5):
        await _outcome(breaker)
    assert breaker.state == State.CLOSED and cloud.calls == 5


async def test_after_open_s_one_probe_goes_through_its_success_closes_its_failure_reopens() -> None:
    breaker, cloud, clock, registry = _breaker(threshold=1, open_s=10)
    cloud.script = [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED]
    await _outcome(breaker)
    clock.now = 9.9
    assert await _outcome(breaker) == OPEN_REASON and cloud.calls == 1
    clock.now = 10
    assert await _outcome(breaker) == "cloud_deadline_exceeded" and cloud.calls == 2  # the probe failed
    clock.now = 19.9
    assert await _outcome(breaker) == OPEN_REASON and cloud.calls == 2, "reopened for another open_s"
    clock.now = 20
    assert await _outcome(breaker) == "ok" and breaker.state == State.CLOSED
    assert await _outcome(breaker) == "ok" and cloud.calls == 4
    transitions = {to: registry.get_sample_value("tandem_edge_cloud_breaker_transitions_total", {"to": to})
                   for to in ("open", "half_open", "closed")}
    assert transitions == {"open": 2, "half_open": 2, "closed": 1}


async def _probe_held(breaker: CircuitBreaker, cloud: ScriptedEscalator, clock: Clock) -> asyncio.Future[str]:
    """Opens the breaker with one failure, then lets its probe out and holds it in the cloud."""
    cloud.script = [grpc.StatusCode.UNAVAILABLE]
    await _outcome(breaker)
    clock.now = 1
    cloud.hold.clear()
    probe = asyncio.ensure_future(_outcome(breaker))
    await asyncio.sleep(0)
    return probe


async def test_while_the_probe_is_out_other_escalations_answer_locally() -> None:
    breaker, cloud, clock, _ = _breaker(threshold=1, open_s=1)
    probe = await _probe_held(breaker, cloud, clock)
    assert breaker.state == State.HALF_OPEN
    assert await _outcome(breaker) == OPEN_REASON and cloud.calls == 2
    cloud.hold.set()
    assert await probe == "ok" and breaker.state == State.CLOSED


async def test_a_cancelled_probe_lets_the_next_call_probe_again() -> None:
    breaker, cloud, clock, _ = _breaker(threshold=1, open_s=1)
    probe = await _probe_held(breaker, cloud, clock)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    cloud.hold.set()
    assert await _outcome(breaker) == "ok" and breaker.state == State.CLOSED
