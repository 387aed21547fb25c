"""Health of the daemon's background loops, each as its own grpc.health sub-service.

A loop that keeps failing (feedback delivery, the updater) reports NOT_SERVING under its own
name, and SERVING again after a success. The daemon's overall health ("" and tandem.v1.Edge)
is not touched here: a cloud outage fails every edge's loops at once, and Kubernetes must not
restart a fleet that still answers every request.
"""

import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

from edge.config import LoopHealthConfig
from edge.metrics import EdgeMetrics

log = logging.getLogger(__name__)

DELIVERY = "tandem.edge.delivery"
UPDATER = "tandem.edge.updater"


class LoopHealth:
    """Counts one loop's consecutive failures and reports its health sub-service."""

    def __init__(
        self,
        service: str,
        servicer: health.aio.HealthServicer,
        cfg: LoopHealthConfig,
        metrics: EdgeMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._servicer = servicer
        self._cfg = cfg
        self._gauge = metrics.loop_serving.labels(service.rsplit(".", 1)[-1])
        self._clock = clock
        self._failures = 0
        self._failing_since = 0.0
        self._serving: bool | None = None

    @property
    def serving(self) -> bool:
        return self._serving is not False

    async def start(self, serving: bool = True) -> None:
        """Reports the initial state; False for a loop that starts in a fault (a corrupt outbox)."""
        await self._report(serving, "")

    async def succeeded(self) -> None:
        self._failures = 0
        await self._report(True, "")

    async def failed(self, why: str) -> None:
        if self._failures == 0:
            self._failing_since = self._clock()
        self._failures += 1
        failing_s = self._clock() - self._failing_since
        if self._failures >= self._cfg.failure_threshold or failing_s >= self._cfg.failing_for_s:
            await self._report(False, f"{self._failures} failures in a row over {failing_s:.0f} s, last: {why}")

    async def _report(self, serving: bool, why: str) -> None:
        if serving == self._serving:
            return
        if self._serving is not None:  # a change, not the state reported at start
            if serving:
                log.info("%s is working again: SERVING", self.service)
            else:
                log.error("%s keeps failing: NOT_SERVING (%s)", self.service, why)
        self._serving = serving
        self._gauge.set(int(serving))
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self._servicer.set(self.service, status)
