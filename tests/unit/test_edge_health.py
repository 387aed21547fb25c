"""Background loops report their own grpc.health sub-service; the daemon's own is untouched."""

from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from edge.config import LoopHealthConfig
from edge.health import UPDATER, LoopHealth
from edge.metrics import EdgeMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _status(servicer: health.aio.HealthServicer, service: str) -> str:
    answer = await servicer.Check(health_pb2.HealthCheckRequest(service=service), None)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


async def test_not_serving_after_the_threshold_of_failures_in_a_row_and_serving_after_a_success() -> None:
    servicer, registry = health.aio.HealthServicer(), CollectorRegistry()
    loop = LoopHealth(UPDATER, servicer, LoopHealthConfig(failure_threshold=3, failing_for_s=1000), EdgeMetrics(registry))
    await loop.start()
    seen = []
    for outcome in ("fail", "fail", "ok", "fail", "fail", "fail", "fail", "ok"):
        await (loop.succeeded() if outcome == "ok" else loop.failed("cloud_unavailable"))
        seen.append(await _status(servicer, UPDATER))
    assert seen == ["SERVING", "SERVING", "SERVING", "SERVING", "SERVING", "NOT_SERVING", "NOT_SERVING", "SERVING"]
    assert registry.get_sample_value("tandem_edge_loop_serving", {"loop": "updater"}) == 1


async def test_not_serving_when_failing_for_longer_than_failing_for_s_however_few_the_attempts() -> None:
    servicer, registry, clock = health.aio.HealthServicer(), CollectorRegistry(), Clock()
    cfg = LoopHealthConfig(failure_threshold=100, failing_for_s=60)
    loop = LoopHealth(UPDATER, servicer, cfg, EdgeMetrics(registry), clock=clock)
    await loop.start()
    await loop.failed("cloud_unavailable")
    clock.now = 59
    await loop.failed("cloud_unavailable")
    assert await _status(servicer, UPDATER) == "SERVING"
    clock.now = 60
    await loop.failed("cloud_unavailable")
    assert await _status(servicer, UPDATER) == "NOT_SERVING" and not loop.serving
    assert registry.get_sample_value("tandem_edge_loop_serving", {"loop": "updater"}) == 0


async def test_the_overall_service_is_never_touched() -> None:
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    loop = LoopHealth(UPDATER, servicer, LoopHealthConfig(failure_threshold=1), EdgeMetrics(CollectorRegistry()))
    await loop.start(serving=False)
    await loop.failed("cloud_unavailable")
    assert await _status(servicer, "") == "SERVING" and await _status(servicer, UPDATER) == "NOT_SERVING"
