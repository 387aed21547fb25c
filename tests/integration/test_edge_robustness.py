"""The edge under faults, with real gRPC, real ONNX students and a real (scripted) cloud:
a stalled cloud trips the circuit breaker, a full queue sheds, a swap cannot hang, loops that
keep failing report their own health, and corrupt files at start do not stop inference."""

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from edge.breaker import OPEN_REASON
from edge.config import BreakerConfig, CloudLinkConfig, FeedbackConfig, LoopHealthConfig, PolicyConfig, UpdaterConfig
from edge.daemon import serve_metrics
from edge.health import DELIVERY, UPDATER
from edge.student import Student
from tandem.signing import public_path, trust
from tandem.subprocesses import free_port
from tandem.v1 import edge_pb2

from .conftest import GatedStudent, ScriptedCloud, running_daemon

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _request(text: str) -> edge_pb2.InferRequest:
    return edge_pb2.InferRequest(task="banking77", text=text.encode())


def _sample(daemon: object, name: str, **labels: str) -> float:
    return daemon.registry.get_sample_value(name, labels) or 0.0  # type: ignore[attr-defined]


async def _health(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return answer.status


async def _until_status(port: int, service: str, wanted: int) -> int:
    """Watches `service` until it reports `wanted` (or the watch times out); the last status."""
    status = -1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        async for answer in watch:
            status = answer.status
            if status == wanted:
                watch.cancel()
                break
    return status


async def test_a_stalled_cloud_opens_the_breaker_and_a_probe_closes_it_when_the_cloud_is_back(
    student_dir: Path, cloud: tuple[ScriptedCloud, str]
) -> None:
    servicer, target = cloud
    servicer.mode = "slow"  # stalls past every deadline, as while Serve restarts a replica
    link = CloudLinkConfig(target=target, insecure=True, deadline_ms=200,
                           breaker=BreakerConfig(failure_threshold=2, open_s=0.5))
    async with running_daemon(student_dir, policy=PolicyConfig(mode="cloud_only"), cloud=link) as (daemon, stub):
        stalled = [await stub.Infer(_request("where is my card"), timeout=5) for _ in range(2)]
        sent = len(servicer.seen)
        tripped = [await stub.Infer(_request("where is my card"), timeout=5) for _ in range(3)]
        not_sent = len(servicer.seen) == sent
        state_open = _sample(daemon, "tandem_edge_cloud_breaker_state")
        servicer.mode = "answer"  # the cloud is back
        await asyncio.sleep(0.6)  # past open_s: the next escalation is the probe
        recovered = [await stub.Infer(_request("where is my card"), timeout=5) for _ in range(2)]
        state_closed = _sample(daemon, "tandem_edge_cloud_breaker_state")
        opened = _sample(daemon, "tandem_edge_cloud_breaker_transitions_total", to="open")
        circuit_open = _sample(daemon, "tandem_edge_decisions_total", task="banking77", reason=OPEN_REASON)
    assert [(r.source, r.reason) for r in stalled] == [(edge_pb2.EDGE_FALLBACK, "cloud_deadline_exceeded")] * 2
    assert [(r.source, r.reason) for r in tripped] == [(edge_pb2.EDGE_FALLBACK, OPEN_REASON)] * 3 and all(r.label for r in tripped)
    assert not_sent, "an open breaker must not send escalations"
    assert [r.source for r in recovered] == [edge_pb2.CLOUD] * 2
    assert (state_open, state_closed, opened, circuit_open) == (2, 0, 1, 3)


async def test_a_full_queue_answers_resource_exhausted_at_once_and_counts_it(student_dir: Path) -> None:
    fields = {"policy": PolicyConfig(mode="edge_only"), "max_batch": 1, "max_queue": 2}
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        runtime = daemon.tasks["banking77"]
        gated = GatedStudent(runtime.serving.student)
        await runtime.swap(gated, drain_timeout_s=5)  # type: ignore[arg-type]
        first = asyncio.ensure_future(stub.Infer(_request("inside the model"), timeout=30))
        await asyncio.to_thread(gated.entered.wait, 10)
        calls = [asyncio.ensure_future(stub.Infer(_request(f"waiting {i}"), timeout=30)) for i in range(10)]
        # While the model is still held, all but `max_queue` of them are refused.
        for _ in range(1000):
            if sum(c.done() for c in calls) == 8:
                break
            await asyncio.sleep(0.01)
        refused = [c for c in calls if c.done()]
        shed = _sample(daemon, "tandem_edge_shed_total", task="banking77")
        gated.release.set()
        answered = await asyncio.gather(first, *(c for c in calls if c not in refused))
    assert len(refused) == shed == 8 and len(answered) == 3 and all(a.label for a in answered)
    for call in refused:
        error = call.exception()
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue is 2" in error.details()
    assert len(gated.ran) == 3, "refused requests never reach the model"


async def test_rpcs_beyond_max_concurrent_rpcs_are_refused_by_the_server(student_dir: Path) -> None:
    async with running_daemon(student_dir, policy=PolicyConfig(mode="edge_only"), max_concurrent_rpcs=1) as (daemon, stub):
        runtime = daemon.tasks["banking77"]
        gated = GatedStudent(runtime.serving.student)
        await runtime.swap(gated, drain_timeout_s=5)  # type: ignore[arg-type]
        first = asyncio.ensure_future(stub.Infer(_request("inside the model"), timeout=30))
        await asyncio.to_thread(gated.entered.wait, 10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Infer(_request("one too many"), timeout=30)
        gated.release.set()
        answered = await first
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and answered.label


@pytest.fixture()
def cloud_down() -> str:
    """An address with nothing behind it."""
    return f"127.0.0.1:{free_port()}"


def _keyring(tmp_path: Path, student_key: Path) -> Path:
    """A keyring trusting the key that signed the configured student (the updater verifies it)."""
    path = tmp_path / "keyring.json"
    trust(path, public_path(student_key))
    return path


async def test_loops_that_keep_failing_report_not_serving_but_the_daemon_stays_serving(
    student_dir: Path, student_key: Path, tmp_path: Path, cloud_down: str
) -> None:
    fields = {
        "policy": PolicyConfig(mode="cloud_only"),
        "cloud": CloudLinkConfig(target=cloud_down, insecure=True, max_reconnect_backoff_ms=200),
        "feedback": FeedbackConfig(outbox=tmp_path / "o.sqlite3", min_backoff_s=0.01, max_backoff_s=0.05),
        "updater": UpdaterConfig(enabled=True, keyring=_keyring(tmp_path, student_key), models_dir=tmp_path / "models",
                                 poll_interval_s=3600),
        "loop_health": LoopHealthConfig(failure_threshold=2),
    }
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        started = {s: await _health(daemon.port, s) for s in (DELIVERY, UPDATER)}
        answer = await stub.Infer(_request("i lost my card"), timeout=5)  # a fallback: delivery has work
        delivery = await _until_status(daemon.port, DELIVERY, NOT_SERVING)
        polls = [await daemon.updater.poll() for _ in range(2)]
        updater = await _health(daemon.port, UPDATER)
        overall = {s: await _health(daemon.port, s) for s in ("", "tandem.v1.Edge")}
        gauges = {loop: _sample(daemon, "tandem_edge_loop_serving", loop=loop) for loop in ("delivery", "updater")}
        still = await stub.Infer(_request("i lost my card"), timeout=5)
    assert started == {DELIVERY: SERVING, UPDATER: SERVING}
    assert answer.source == edge_pb2.EDGE_FALLBACK and still.label
    assert polls == [{"banking77": "cloud_unavailable"}] * 2
    assert (delivery, updater) == (NOT_SERVING, NOT_SERVING) and gauges == {"delivery": 0, "updater": 0}
    assert overall == {"": SERVING, "tandem.v1.Edge": SERVING}, "a cloud outage must not fail liveness"


async def test_a_corrupt_outbox_is_set_aside_and_the_daemon_serves_and_records(
    student_dir: Path, tmp_path: Path, cloud_down: str
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    garbage = b"not an SQLite database: a torn write, a bad sector " * 64
    outbox.write_bytes(garbage)
    fields = {"policy": PolicyConfig(mode="edge_only"), "cloud": CloudLinkConfig(target=cloud_down, insecure=True),
              "feedback": FeedbackConfig(outbox=outbox)}
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        answer = await stub.Infer(_request("top up failed"), timeout=5)
        correction = await stub.Correct(edge_pb2.CorrectRequest(task="banking77", text=b"hi", label="card_arrival"), timeout=5)
        delivery = await _health(daemon.port, DELIVERY)
        overall = await _health(daemon.port, "")
        faults = _sample(daemon, "tandem_edge_storage_faults_total", store="outbox")
    (aside,) = tmp_path.glob("outbox.sqlite3.corrupt-*")
    assert aside.read_bytes() == garbage, "the corrupt file is kept as it was"
    assert answer.label and correction.record_id
    assert (delivery, overall, faults) == (NOT_SERVING, SERVING, 1)


async def test_a_corrupt_model_state_is_set_aside_and_the_configured_artifact_serves(
    student_dir: Path, student_key: Path, tmp_path: Path, cloud_down: str
) -> None:
    state = tmp_path / "models" / "banking77" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"current": "v9", "previous": ')  # torn
    fields = {"policy": PolicyConfig(mode="edge_only"), "cloud": CloudLinkConfig(target=cloud_down, insecure=True),
              "updater": UpdaterConfig(enabled=True, keyring=_keyring(tmp_path, student_key),
                                       models_dir=tmp_path / "models", poll_interval_s=3600)}
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        answer = await stub.Infer(_request("top up failed"), timeout=5)
        faults = _sample(daemon, "tandem_edge_storage_faults_total", store="model_state")
    (aside,) = state.parent.glob("state.json.corrupt-*")
    assert aside.read_text() == '{"current": "v9", "previous": '
    assert answer.model_version == Student.load(student_dir).version and faults == 1


def test_the_metrics_port_binds_the_configured_host() -> None:
    registry = CollectorRegistry()
    Counter("probe", "A sample to scrape.", registry=registry).inc()
    port = free_port()
    server = serve_metrics(port, "127.0.0.2", registry)  # another loopback address
    try:
        scraped = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert "probe_total 1.0" in scraped
