"""A circuit breaker in front of the cloud: fail fast while the cloud is not answering.

Without it every escalation waits out the full deadline while the cloud is down (a replica
restarting, an outage). After `failure_threshold` consecutive failures that mean "the cloud
is not answering", the breaker opens and escalations fall back locally at once; after
`open_s` a single probe escalation goes through (half-open): its success closes the breaker,
its failure opens it again.
"""

import logging
import time
from collections.abc import Callable
from enum import IntEnum

import grpc

from edge.cloud_client import Escalator
from edge.config import BreakerConfig
from edge.errors import CloudCallError
from edge.metrics import EdgeMetrics
from tandem.v1 import expert_pb2

log = logging.getLogger(__name__)

# Failures that say nothing about the request and everything about the cloud's state. Others
# (INVALID_ARGUMENT, NOT_FOUND, INTERNAL) come from a cloud that answered.
NOT_ANSWERING = frozenset(
    {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
OPEN_REASON = "cloud_circuit_open"


class State(IntEnum):
    """Values of the `tandem_edge_cloud_breaker_state` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """An Escalator that guards another one."""

    def __init__(
        self,
        escalator: Escalator,
        cfg: BreakerConfig,
        metrics: EdgeMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._escalator = escalator
        self._cfg = cfg
        self._metrics = metrics
        self._clock = clock
        self._state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        metrics.breaker_state.set(State.CLOSED)

    @property
    def state(self) -> State:
        return self._state

    async def escalate(self, request: expert_pb2.EscalateRequest) -> expert_pb2.EscalateResponse:
        if not self._admit():
            raise CloudCallError(
                grpc.StatusCode.UNAVAILABLE, "the cloud stopped answering; answering locally until a probe succeeds",
                OPEN_REASON,
            )
        probe = self._state == State.HALF_OPEN
        try:
            reply = await self._escalator.escalate(request)
        except CloudCallError as exc:
            if exc.code in NOT_ANSWERING:
                self._failed(exc)
            else:
                self._answered()
            raise
        except BaseException:
            if probe:  # cancelled or crashed: it proved nothing, so the next call probes again
                self._move(State.OPEN)
            raise
        self._answered()
        return reply

    def _admit(self) -> bool:
        """Whether this call may go to the cloud; moves OPEN to HALF_OPEN once `open_s` passed."""
        if self._state == State.CLOSED:
            return True
        if self._state == State.OPEN and self._clock() - self._opened_at >= self._cfg.open_s:
            self._move(State.HALF_OPEN)
            return True
        return False  # open, or a probe is already out

    def _answered(self) -> None:
        self._failures = 0
        if self._state != State.CLOSED:
            log.info("the cloud answered a probe: escalating again")
            self._move(State.CLOSED)

    def _failed(self, exc: CloudCallError) -> None:
        self._failures += 1
        if self._state == State.HALF_OPEN or self._failures >= self._cfg.failure_threshold:
            if self._state == State.CLOSED:
                log.warning("%d escalations in a row failed (last: %s): answering locally for %.1f s",
                            self._failures, exc, self._cfg.open_s)
            self._opened_at = self._clock()
            self._move(State.OPEN)

    def _move(self, state: State) -> None:
        if state != self._state:
            self._metrics.breaker_transitions.labels(state.name.lower()).inc()
            self._metrics.breaker_state.set(state)
        self._state = state
