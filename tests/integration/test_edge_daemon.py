"""The edge daemon with real ONNX Runtime, real gRPC and a real (scripted) Cloud server."""

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.config import CloudLinkConfig, FeedbackConfig, PolicyConfig
from edge.errors import ArtifactError
from edge.outbox import Outbox
from tandem.contract import CALLER_TIMEOUT_METADATA, FLEET_APPLICATION, TEXT_MAX_BYTES
from tandem.v1 import edge_pb2, expert_pb2, fleet_pb2

from .conftest import ROUTES, ScriptedCloud, running_daemon, serve_cloud

pytestmark = pytest.mark.integration

EDGE_ONLY = {"policy": PolicyConfig(mode="edge_only")}


def _escalating(target: str, deadline_ms: float = 2000, **cloud: float) -> dict:
    return {"policy": PolicyConfig(mode="cloud_only"),
            "cloud": CloudLinkConfig(target=target, insecure=True, deadline_ms=deadline_ms, **cloud)}


def _request(text: str, **kw: str) -> edge_pb2.InferRequest:
    return edge_pb2.InferRequest(task="banking77", text=text.encode(), **kw)


async def test_answers_locally_with_a_label_of_the_task_and_a_calibrated_confidence(
    student_dir: Path, banking_texts: list[str]
) -> None:
    manifest = json.loads((student_dir / "manifest.json").read_text())
    version, oos = manifest["version"], manifest["out_of_scope"]["label"]
    labels = [*json.loads((student_dir / "labels.json").read_text()), oos]  # the model's classes, and its boundary's
    async with running_daemon(student_dir, **EDGE_ONLY) as (_, stub):
        for text in banking_texts[:20]:
            r = await stub.Infer(_request(text), timeout=5)
            assert r.source == edge_pb2.EDGE and r.reason == "edge_only"
            assert r.label in labels and 0 < r.confidence <= 1
            assert r.out_of_scope == (r.label == oos) and r.label_set_version == manifest["label_set_version"]
            assert r.model_version == version and len(r.request_id) == 32
            assert r.timings.inference_ms > 0 and r.timings.total_ms >= r.timings.inference_ms


async def test_escalates_to_the_cloud_and_carries_the_request_id(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    async with running_daemon(student_dir, **_escalating(target)) as (_, stub):
        r = await stub.Infer(_request("my card has not arrived yet", request_id="req-42"), timeout=5)
    assert (r.source, r.label, r.expert, r.request_id) == (edge_pb2.CLOUD, "card_arrival", "scripted", "req-42")
    assert r.reason == "cloud_only" and r.confidence == pytest.approx(0.97)
    sent, metadata = servicer.seen[-1]
    assert sent.request_id == "req-42" and sent.task == "banking77"
    assert sent.text == "my card has not arrived yet" and sent.edge.model_version == r.model_version
    assert metadata["x-request-id"] == "req-42" and metadata["application"] == ROUTES["banking77"]
    # What is left of the 2 s deadline, for the expert (Serve's proxy drops the gRPC deadline).
    assert 1000 < int(metadata[CALLER_TIMEOUT_METADATA]) <= 2000
    (asked,) = servicer.routes_asked  # once, then cached
    assert asked["application"] == FLEET_APPLICATION


async def test_a_task_the_cloud_has_no_route_for_falls_back_until_the_cloud_names_one(
    student_dir: Path, cloud: tuple[ScriptedCloud, str]
) -> None:
    servicer, target = cloud
    servicer.routes = {"weather": "weather-expert"}
    async with running_daemon(student_dir, **_escalating(target, routes_refresh_s=1.0)) as (daemon, stub):
        # Concurrent first escalations: one of them asks the cloud, the others wait for its answer.
        unrouted = await asyncio.gather(*(stub.Infer(_request("where is my card"), timeout=5) for _ in range(3)))
        servicer.routes = dict(ROUTES)
        await asyncio.sleep(1.1)  # past routes_refresh_s: the next escalation asks again
        routed = await stub.Infer(_request("where is my card"), timeout=5)
        no_route = daemon.registry.get_sample_value(
            "tandem_edge_decisions_total", {"task": "banking77", "reason": "cloud_no_route"})
    assert {(r.source, r.reason) for r in unrouted} == {(edge_pb2.EDGE_FALLBACK, "cloud_no_route")}
    assert all(r.label for r in unrouted) and no_route == 3
    assert len(servicer.routes_asked) == 2, "asked at the first escalation and once after the refresh interval"
    assert (routed.source, routed.expert) == (edge_pb2.CLOUD, "scripted")
    ((_, metadata),) = servicer.seen
    assert metadata["application"] == ROUTES["banking77"]


async def test_a_task_moved_to_another_expert_is_routed_again(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    servicer.routes = {"banking77": "old-expert"}
    async with running_daemon(student_dir, **_escalating(target, routes_refresh_s=0.5)) as (_, stub):
        before = await stub.Infer(_request("where is my card"), timeout=5)
        servicer.routes = {"banking77": "new-expert"}  # the cloud's topology changed
        # The old application is gone: the edge asks the routes again at once and resends.
        moved = await stub.Infer(_request("where is my card"), timeout=5)
        await asyncio.sleep(0.6)  # past routes_refresh_s
        after = await stub.Infer(_request("where is my card"), timeout=5)
    assert before.source == edge_pb2.CLOUD
    assert moved.source == edge_pb2.CLOUD and servicer.seen[-2][1]["application"] == "new-expert"
    assert after.source == edge_pb2.CLOUD and servicer.seen[-1][1]["application"] == "new-expert"


async def test_slow_cloud_gets_a_local_fallback_at_the_deadline(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    servicer.mode = "slow"
    async with running_daemon(student_dir, **_escalating(target, deadline_ms=300)) as (_, stub):
        r = await stub.Infer(_request("what is the exchange rate"), timeout=4)
    assert r.source == edge_pb2.EDGE_FALLBACK and r.reason == "cloud_deadline_exceeded"
    assert r.label and 250 < r.timings.cloud_ms < 2000


async def test_stopped_cloud_gets_a_local_fallback(student_dir: Path) -> None:
    async with serve_cloud() as (_, target):
        pass  # started and stopped: nothing listens there any more
    async with running_daemon(student_dir, **_escalating(target)) as (_, stub):
        r = await stub.Infer(_request("i lost my card"), timeout=5)
    assert r.source == edge_pb2.EDGE_FALLBACK and r.reason == "cloud_unavailable" and r.label


async def test_escalator_fails_fast_while_disconnected_and_recovers() -> None:
    from edge.cloud_client import CloudClient
    from edge.errors import CloudCallError

    async with serve_cloud() as (_, target):
        pass  # the cloud's address, now with nothing behind it
    escalator = CloudClient(CloudLinkConfig(target=target, insecure=True, max_reconnect_backoff_ms=200,
                                                routes_refresh_s=0.1))
    request = expert_pb2.EscalateRequest(request_id="r", task="banking77", text="hi")
    with pytest.raises(CloudCallError):
        await escalator.escalate(request)  # tries, with retries, and fails
    with pytest.raises(CloudCallError, match="not connected"):
        await escalator.escalate(request)  # refused without sending
    async with serve_cloud(int(target.rsplit(":", 1)[1])):  # the cloud comes back
        answer = None
        for _ in range(50):
            await asyncio.sleep(0.1)
            try:
                answer = await escalator.escalate(request)
                break
            except CloudCallError:
                continue
        await escalator.close()
    assert answer is not None and answer.label == "card_arrival", "the channel never reconnected"


async def test_overloaded_cloud_gets_a_local_fallback(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    servicer.mode = "overloaded"
    async with running_daemon(student_dir, **_escalating(target)) as (daemon, stub):
        r = await stub.Infer(_request("cancel my transfer"), timeout=5)
        fallbacks = daemon.registry.get_sample_value(
            "tandem_edge_decisions_total", {"task": "banking77", "reason": "cloud_resource_exhausted"}
        )
    assert r.source == edge_pb2.EDGE_FALLBACK and r.reason == "cloud_resource_exhausted"
    assert len(servicer.seen) == 1, "RESOURCE_EXHAUSTED must not be retried"
    assert fallbacks == 1


async def test_unavailable_is_retried_by_the_channel(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    servicer.mode = "unavailable_once"
    async with running_daemon(student_dir, **_escalating(target)) as (_, stub):
        r = await stub.Infer(_request("cancel my transfer", request_id="retry-1"), timeout=5)
    assert r.source == edge_pb2.CLOUD and r.label == "card_arrival"
    assert [sent.request_id for sent, _ in servicer.seen] == ["retry-1", "retry-1"]


@pytest.mark.parametrize(
    ("request_fields", "field", "fragment"),
    [
        ({"task": "banking77", "text": b""}, "text", "empty"),
        ({"task": "banking77", "text": b" \n\t"}, "text", "blank"),
        ({"task": "banking77", "text": b"x" * (TEXT_MAX_BYTES + 1)}, "text", f"limit of {TEXT_MAX_BYTES} bytes"),
        ({"task": "banking77", "text": b"ok \xff\xfe"}, "text", "invalid UTF-8 at byte 3"),
        ({"task": "weather", "text": b"hello"}, "task", "unknown task 'weather'"),
        ({"task": "banking77", "text": b"hi", "request_id": "r" * 129}, "request_id", "128"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_field_and_limit(
    student_dir: Path, request_fields: dict, field: str, fragment: str
) -> None:
    async with running_daemon(student_dir, **EDGE_ONLY) as (daemon, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Infer(edge_pb2.InferRequest(**request_fields), timeout=5)
        # The daemon keeps serving after refusing.
        assert (await stub.Infer(_request("still there?"), timeout=5)).label
        rejected = daemon.registry.get_sample_value("tandem_edge_rejected_total", {"field": field})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:") and fragment in info.value.details()
    assert rejected == 1


async def test_concurrent_requests_are_batched_and_all_answered(student_dir: Path, banking_texts: list[str]) -> None:
    async with running_daemon(student_dir, **EDGE_ONLY) as (daemon, stub):
        single = {t: (await stub.Infer(_request(t), timeout=5)).label for t in banking_texts[:64]}
        batched = await asyncio.gather(*(stub.Infer(_request(t), timeout=10) for t in banking_texts[:64]))
        sizes = daemon.registry.get_sample_value("tandem_edge_batch_size_sum", {"task": "banking77"})
        count = daemon.registry.get_sample_value("tandem_edge_batch_size_count", {"task": "banking77"})
    # Sharing a batch with other texts must not change a text's answer.
    assert [r.label for r in batched] == [single[t] for t in banking_texts[:64]]
    assert count == 128 and sizes > count, "concurrent requests never shared a model run"


async def test_health_and_metrics(student_dir: Path) -> None:
    async with running_daemon(student_dir, **EDGE_ONLY) as (daemon, stub):
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{daemon.port}")
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Edge"), timeout=5)
        await channel.close()
        for _ in range(3):
            await stub.Infer(_request("top up failed"), timeout=5)
        answered = daemon.registry.get_sample_value("tandem_edge_requests_total", {"task": "banking77", "source": "EDGE"})
        version = json.loads((student_dir / "manifest.json").read_text())["version"]
        info = daemon.registry.get_sample_value("tandem_edge_model_info", {"task": "banking77", "version": version})
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert answered == 3 and info == 1


async def test_corrupt_artifact_is_refused_at_start(artifact_copy: Path) -> None:
    model = artifact_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        async with running_daemon(artifact_copy, **EDGE_ONLY):
            pass


async def test_incomplete_artifact_is_refused_at_start(artifact_copy: Path) -> None:
    (artifact_copy / "labels.json").unlink()
    with pytest.raises(ArtifactError, match="labels.json"):
        async with running_daemon(artifact_copy, **EDGE_ONLY):
            pass


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable artifact"),
        (lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"temperature"', '"temp"')), "unreadable artifact: .*temperature"),
    ],
)
async def test_malformed_artifact_is_refused_with_an_artifact_error(artifact_copy: Path, damage, fragment: str) -> None:
    damage(artifact_copy)
    with pytest.raises(ArtifactError, match=fragment):
        async with running_daemon(artifact_copy, **EDGE_ONLY):
            pass


def _outbox_records(daemon) -> list[fleet_pb2.FeedbackRecord]:
    """What the daemon's outbox holds, read through a connection of our own (WAL allows it)."""
    outbox = Outbox(daemon.cfg.feedback.outbox, max_records=1)
    try:
        return outbox.oldest(1000)
    finally:
        outbox.close()


async def test_escalations_leave_the_device_redacted_and_name_it(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    async with running_daemon(student_dir, device_id="kiosk-7", **_escalating(target)) as (_, stub):
        await stub.Infer(_request("card 4111 1111 1111 1111 never came, mail me at a@b.com"), timeout=5)
    sent, _ = servicer.seen[-1]
    assert sent.text == "card [CARD] never came, mail me at [EMAIL]" and sent.device_id == "kiosk-7"


async def test_every_fallback_is_kept_redacted_with_the_edge_prediction(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    servicer, target = cloud
    servicer.mode = "overloaded"
    async with running_daemon(student_dir, **_escalating(target)) as (daemon, stub):
        r = await stub.Infer(_request("call me on +44 20 7946 0958", request_id="fb-1"), timeout=5)
        records = _outbox_records(daemon)
    assert r.source == edge_pb2.EDGE_FALLBACK
    (record,) = records
    assert (record.kind, record.request_id, record.text) == (fleet_pb2.FALLBACK, "fb-1", "call me on [PHONE]")
    assert (record.edge.label, record.edge.model_version) == (r.label, r.model_version) and not record.label


@pytest.mark.parametrize("audit_rate", [0.0, 1.0])
async def test_local_answers_are_sampled_as_audit_records_at_the_configured_rate(
    student_dir: Path, cloud: tuple[ScriptedCloud, str], tmp_path: Path, audit_rate: float
) -> None:
    _, target = cloud
    fields = {"policy": PolicyConfig(mode="edge_only"), "cloud": CloudLinkConfig(target=target, insecure=True),
              "feedback": FeedbackConfig(outbox=tmp_path / "o.sqlite3", audit_rate=audit_rate)}
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        answers = [await stub.Infer(_request(f"top up failed {i}", request_id=f"a-{i}"), timeout=5) for i in range(3)]
    # Audit samples are written in the background; stopping the daemon waited for them.
    records = _outbox_records(daemon)
    expected = [(fleet_pb2.AUDIT, a.request_id, a.label) for a in answers] if audit_rate else []
    assert sorted((r.kind, r.request_id, r.edge.label) for r in records) == expected


async def test_corrections_are_kept_and_answer_their_record_id(student_dir: Path, cloud: tuple[ScriptedCloud, str]) -> None:
    _, target = cloud
    async with running_daemon(student_dir, **_escalating(target)) as (daemon, stub):
        answer = await stub.Correct(edge_pb2.CorrectRequest(
            task="banking77", text=b"my card a@b.com is stuck", label="card_swallowed", request_id="req-9"), timeout=5)
        records = _outbox_records(daemon)
    (record,) = records
    assert record.record_id == answer.record_id and record.kind == fleet_pb2.CORRECTION
    assert (record.label, record.request_id, record.text) == ("card_swallowed", "req-9", "my card [EMAIL] is stuck")


@pytest.mark.parametrize(
    ("request_fields", "field", "fragment"),
    [
        ({"task": "banking77", "text": b"hi", "label": "not_a_label"}, "label", "'not_a_label' is not one of the 78 labels"),
        ({"task": "banking77", "text": b"", "label": "card_arrival"}, "text", "empty"),
        ({"task": "weather", "text": b"hi", "label": "card_arrival"}, "task", "unknown task"),
    ],
)
async def test_bad_corrections_are_invalid_argument_naming_the_field(
    student_dir: Path, cloud: tuple[ScriptedCloud, str], request_fields: dict, field: str, fragment: str
) -> None:
    _, target = cloud
    async with running_daemon(student_dir, **_escalating(target)) as (daemon, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Correct(edge_pb2.CorrectRequest(**request_fields), timeout=5)
        assert _outbox_records(daemon) == []
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:") and fragment in info.value.details()


async def test_corrections_to_a_daemon_without_feedback_are_failed_precondition(student_dir: Path) -> None:
    async with running_daemon(student_dir, **EDGE_ONLY) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Correct(edge_pb2.CorrectRequest(task="banking77", text=b"hi", label="card_arrival"), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "keeps no feedback" in info.value.details()


async def test_a_full_outbox_refuses_corrections_and_counts_them(student_dir: Path, cloud: tuple[ScriptedCloud, str], tmp_path: Path) -> None:
    _, target = cloud  # the scripted cloud has no ReportFeedback: nothing leaves the outbox
    fields = {**_escalating(target), "feedback": FeedbackConfig(outbox=tmp_path / "o.sqlite3", max_records=2)}
    correction = edge_pb2.CorrectRequest(task="banking77", text=b"hi", label="card_arrival")
    async with running_daemon(student_dir, **fields) as (daemon, stub):
        for _ in range(2):
            await stub.Correct(correction, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Correct(correction, timeout=5)
        refused = daemon.registry.get_sample_value(
            "tandem_edge_feedback_refused_total", {"task": "banking77", "kind": "CORRECTION", "reason": "full"})
        depth = daemon.registry.get_sample_value("tandem_edge_outbox_records")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in info.value.details()
    assert (refused, depth) == (1, 2)
