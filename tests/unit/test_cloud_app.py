"""cloud.app without Ray: the fleet builder's deployment options, and the Expert class on a
plain grpc.aio server with a stand-in runner (no vLLM), as the edge calls it."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

import cloud.app
import cloud.experts.engine
from cloud.app import Expert, fleet_app
from cloud.experts.protocol import Answer
from cloud.feedback.receipts import create_key, load_key, verify
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from tandem.contract import CALLER_TIMEOUT_METADATA
from tandem.v1 import common_pb2, expert_pb2, expert_pb2_grpc, fleet_pb2

LABELS = ["card_arrival", "lost_card"]


TASK = {"name": "t", "train": "unused.csv", "test": "unused.csv", "labels": LABELS}


def _cloud_yaml(tmp_path: Path, **fields: Any) -> Path:
    cfg = {"tasks": {"t": {"task": TASK, "expert": "e"}}, "experts": [{"name": "e", "kind": "generate", "model": "m"}],
           **fields}
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_fleet_deployment_is_bounded_and_placed_as_configured(tmp_path: Path) -> None:
    fleet = {"max_ongoing_requests": 7, "max_queued_requests": 11, "request_timeout_s": 2.5, "device_quota_per_day": 9,
             "ray_resources": {"feedback_writer": 1}}
    deployment = fleet_app({"config": str(_cloud_yaml(tmp_path, fleet=fleet))})._bound_deployment
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (7, 11)
    assert deployment.ray_actor_options["resources"] == {"feedback_writer": 1}
    *_, options, insecure = deployment.init_args
    assert (options["request_timeout_s"], options["device_quota_per_day"], insecure) == (2.5, 9, False)


def test_both_deployments_read_the_configured_receipt_key(tmp_path: Path) -> None:
    key = tmp_path / "secrets" / "receipt.key"
    config = {"config": str(_cloud_yaml(tmp_path, receipt_key=str(key))), "expert": "e"}
    assert str(key) in cloud.app.fleet_app(config)._bound_deployment.init_args
    assert str(key) in cloud.app.expert_app(config)._bound_deployment.init_args


def test_the_fleet_deployment_is_bounded_by_default(tmp_path: Path) -> None:
    """Serve's own defaults (few slots, an unbounded queue) let slow FetchModel readers starve the fleet."""
    deployment = fleet_app({"config": str(_cloud_yaml(tmp_path))})._bound_deployment
    assert deployment.max_ongoing_requests > 5 and deployment.max_queued_requests > 0


class Runner:
    """Stands in for a vLLM engine: answers at once, or hangs until cancelled (`hang`), or
    answers anyway when cancelled (`late`: the engine's answer came as the deadline passed)."""

    def __init__(self, mode: str = "answer") -> None:
        self.mode = mode
        self.calls = 0

    async def answer(self, text: str, task: str, request_id: str) -> Answer:
        labels = LABELS
        self.calls += 1
        if self.mode != "answer":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                if self.mode == "hang":
                    raise
        return Answer(labels[0], 0.9, [(labels[0], 0.9), (labels[1], 0.1)])


class Engine:
    def __init__(self) -> None:
        self.stopped = False

    def shutdown(self) -> None:
        self.stopped = True


class Served:
    """An Expert on a grpc.aio server, and every answer it gave."""

    def __init__(self, stub: expert_pb2_grpc.ExpertStub, runner: Runner, answers: list[expert_pb2.EscalateResponse]) -> None:
        self.stub = stub
        self.runner = runner
        self.answers = answers

    def recorded(self, key_path: Path) -> list[fleet_pb2.FeedbackRecord]:
        """The records the answers' receipts carry, verified under the key at `key_path`."""
        return [verify(a.receipt, load_key(key_path), "receipt") for a in self.answers if a.receipt.record]


@contextlib.asynccontextmanager
async def serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, runner: Runner, timeout_s: float = 30.0,
                  insecure: bool = True) -> AsyncIterator[Served]:
    """An Expert on a grpc.aio server, signing with a key under `tmp_path` (receipt.key)."""
    answers: list[expert_pb2.EscalateResponse] = []
    base = Expert.func_or_class

    class Standalone(base):  # type: ignore[misc, valid-type]
        def _build_runner(self, engine: Any) -> Runner:
            return runner

        async def Escalate(self, body: Any, grpc_context: Any) -> expert_pb2.EscalateResponse:
            answer = await super().Escalate(body, grpc_context)
            answers.append(answer)
            return answer

        def __del__(self) -> None:
            """Garbage collection would call the base's async one without awaiting it."""

    monkeypatch.setattr(cloud.app, "log_to_serve", lambda: None)  # Serve's handlers exist only in a replica
    engine = Engine()
    monkeypatch.setattr(cloud.experts.engine, "build_engine", lambda cfg: engine)
    create_key(tmp_path / "receipt.key")
    expert = Standalone({"name": "e", "kind": "generate", "model": "m"}, {"t": TASK}, timeout_s,
                        str(tmp_path / "receipt.key"), insecure)
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServicer_to_server(expert, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(expert_pb2_grpc.ExpertStub(channel), runner, answers)
    finally:
        await server.stop(0)
        await base.__del__(expert)  # as Serve does at a replica's stop
    assert engine.stopped, "the engine's process would outlive the replica"


def _request(request_id: str = "r1") -> expert_pb2.EscalateRequest:
    return expert_pb2.EscalateRequest(request_id=request_id, task="t", text="where is my card", device_id="kiosk-1")


async def _status(stub: expert_pb2_grpc.ExpertStub, caller_ms: str | None) -> tuple[grpc.StatusCode, str]:
    metadata = () if caller_ms is None else ((CALLER_TIMEOUT_METADATA, caller_ms),)
    try:
        await stub.Escalate(_request(), metadata=metadata, timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_an_escalation_is_answered_with_the_receipt_of_its_record(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """The expert records nothing itself: the edge keeps the receipt and delivers it."""
    async with serving(monkeypatch, tmp_path, Runner()) as served:
        answer = await served.stub.Escalate(_request(), metadata=((CALLER_TIMEOUT_METADATA, "10000"),), timeout=60)
    assert answer.label == LABELS[0] and answer.receipt.key_id == load_key(tmp_path / "receipt.key").key_id
    (record,) = served.recorded(tmp_path / "receipt.key")
    assert (record.kind, record.request_id, record.task, record.text) == (fleet_pb2.ESCALATION, "r1", "t", "where is my card")
    assert (record.label, record.expert, list(record.distribution)) == (answer.label, "e", list(answer.distribution))
    assert record.record_id.startswith("esc/kiosk-1/") and record.created_unix_ms > 1_700_000_000_000


@pytest.mark.parametrize(("mode", "details"), [
    ("hang", "did not answer within 0.050 s"),  # the engine is cancelled at the caller's deadline
    ("late", "answered after the caller's deadline; answer dropped"),  # its answer came as the deadline passed
])
async def test_the_expert_gives_up_at_the_callers_deadline_and_answers_no_receipt(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, details: str) -> None:
    """The caller has answered with its fallback by then."""
    async with serving(monkeypatch, tmp_path, Runner(mode)) as served:
        code, message = await _status(served.stub, "50")  # the client itself would wait far longer
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and details in message
    assert served.recorded(tmp_path / "receipt.key") == []


async def test_without_a_caller_deadline_expert_timeout_s_bounds_the_work(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    async with serving(monkeypatch, tmp_path, Runner("hang"), timeout_s=0.05) as served:
        code, message = await _status(served.stub, None)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "did not answer within 0.050 s" in message
        # A caller's deadline never extends expert_timeout_s.
        assert await _status(served.stub, "60000") == (code, message)


async def test_a_passed_or_malformed_caller_deadline_starts_no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async with serving(monkeypatch, tmp_path, Runner()) as served:
        code, message = await _status(served.stub, "0")
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "passed before the expert started" in message
        code, message = await _status(served.stub, "soon")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"metadata {CALLER_TIMEOUT_METADATA}: 'soon'" in message
        assert served.runner.calls == 0


PROXY_TOKEN = "proxy-secret"


def _proxied(device: str, token: str = PROXY_TOKEN) -> tuple[tuple[str, str], ...]:
    """The metadata the TLS proxy sets on a call from `device`."""
    return (PROXY_TOKEN_METADATA, token), (DEVICE_METADATA, device)


async def test_an_escalations_receipt_names_the_verified_device_whatever_it_claims(monkeypatch: pytest.MonkeyPatch,
                                                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("TANDEM_PROXY_TOKEN", PROXY_TOKEN)
    async with serving(monkeypatch, tmp_path, Runner(), insecure=False) as served:
        await served.stub.Escalate(_request(), metadata=_proxied("kiosk-2"), timeout=60)  # claims kiosk-1
    (record,) = served.recorded(tmp_path / "receipt.key")
    assert record.device_id == "kiosk-2" and record.record_id.startswith("esc/kiosk-2/")


@pytest.mark.parametrize(("metadata", "details"), [
    ((), "did not come through the TLS proxy"),
    (_proxied("kiosk-2", token="guessed"), "did not come through the TLS proxy"),
    (_proxied("")[:1], "no verified device certificate"),
])
async def test_an_escalation_without_a_verified_device_is_unauthenticated(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, metadata: tuple[tuple[str, str], ...], details: str) -> None:
    monkeypatch.setenv("TANDEM_PROXY_TOKEN", PROXY_TOKEN)
    async with serving(monkeypatch, tmp_path, Runner(), insecure=False) as served:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.Escalate(_request(), metadata=metadata, timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and details in info.value.details()
        assert served.runner.calls == 0


@pytest.mark.parametrize(("edge", "details"), [
    (common_pb2.EdgePrediction(label="weather"), "edge.label: 'weather' is not a label of task t"),
    (common_pb2.EdgePrediction(confidence=1.5), "edge.confidence: 1.5 is not in [0, 1]"),
    (common_pb2.EdgePrediction(confidence=float("nan")), "edge.confidence: nan is not in [0, 1]"),
    (common_pb2.EdgePrediction(model_version="../v1"), "edge.model_version: invalid name '../v1'"),
])
async def test_an_escalations_edge_prediction_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         edge: common_pb2.EdgePrediction, details: str) -> None:
    async with serving(monkeypatch, tmp_path, Runner()) as served:
        request = _request()
        request.edge.CopyFrom(edge)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.Escalate(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and details in info.value.details()
        assert served.runner.calls == 0


def test_a_task_the_cloud_does_not_have_is_never_a_metric_label_value() -> None:
    """Else any name a store directory or a caller brings would add a metric series."""

    class Recorded:
        tags: list[dict[str, str]] = []

        def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            self.tags.append(tags or {})

    metrics = cloud.app.ServeFleetMetrics(["t"])
    metrics._records = metrics._quarantined = Recorded()
    metrics.feedback("t", "AUDIT", "stored", 1)
    metrics.feedback("random-name-1", "AUDIT", "stored", 1)
    metrics.quarantined("random-name-2", "/store/task=random-name-2/part-1.parquet")
    assert [t["task"] for t in Recorded.tags] == ["t", cloud.app.UNKNOWN_TASK, cloud.app.UNKNOWN_TASK]
