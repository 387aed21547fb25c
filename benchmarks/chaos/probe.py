"""Whether the cloud answers, seen from outside the edges: an enrolled probe device calls
the expert (Expert.Escalate) and the fleet (Fleet.GetRoutes) straight through the TLS proxy,
every `interval_s`. The probe reports nothing, so it adds no feedback to the store."""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc

from edge.cloud_client import FLEET_METADATA, open_channel
from edge.config import CloudLinkConfig
from tandem.v1 import common_pb2, expert_pb2, expert_pb2_grpc, fleet_pb2, fleet_pb2_grpc

PROBE_DEVICE = "chaos-probe"


@dataclass
class CloudProbe:
    link: dict[str, object]  # the probe device's `cloud` section (CloudFiles.link)
    task: str
    label: str  # any label of the task, for the probe's edge prediction
    interval_s: float = 0.5
    timeout_s: float = 1.0
    # (monotonic time, expert answered, fleet answered), one per probe.
    history: list[tuple[float, bool, bool]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def up_after(self, since: float, timeout_s: float, expert: bool = True, fleet: bool = True) -> float:
        """The first time at or after `since` when the parts asked for both answered;
        TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, expert_ok, fleet_ok in self.history:
                if t >= since and (expert_ok or not expert) and (fleet_ok or not fleet):
                    return t
            await asyncio.sleep(self.interval_s / 2)
        raise TimeoutError(f"the cloud did not answer the probe within {timeout_s:.0f} s")

    async def _run(self) -> None:
        async with open_channel(CloudLinkConfig.model_validate(self.link), PROBE_DEVICE) as channel:
            fleet = fleet_pb2_grpc.FleetStub(channel)
            expert = expert_pb2_grpc.ExpertStub(channel)
            application = ""
            i = 0
            while True:
                started = time.monotonic()
                fleet_ok, routes = await self._ok(fleet.GetRoutes(fleet_pb2.GetRoutesRequest(), metadata=FLEET_METADATA,
                                                                 timeout=self.timeout_s))
                if routes is not None:
                    application = routes.applications.get(self.task, application)
                expert_ok = False
                if application:
                    expert_ok, _ = await self._ok(expert.Escalate(self._escalation(i), timeout=self.timeout_s,
                                                                  metadata=(("application", application),)))
                self.history.append((started, expert_ok, fleet_ok))
                i += 1
                await asyncio.sleep(max(0.0, started + self.interval_s - time.monotonic()))

    def _escalation(self, i: int) -> expert_pb2.EscalateRequest:
        return expert_pb2.EscalateRequest(
            request_id=f"probe-{i}", task=self.task, text="how do I activate my card",
            edge=common_pb2.EdgePrediction(label=self.label, confidence=0.5, model_version="probe"),
            device_id=PROBE_DEVICE)

    @staticmethod
    async def _ok(call: "grpc.aio.UnaryUnaryCall") -> tuple[bool, object | None]:
        try:
            return True, await call
        except grpc.aio.AioRpcError:
            return False, None
