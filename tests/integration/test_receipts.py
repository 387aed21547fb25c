"""Escalation receipts end to end, without vLLM: a real edge daemon, an expert that signs its
answers as `cloud.app.Expert` does, and the real Fleet servicer storing what the edge
delivers. Every answered escalation is stored once, from the edge's durable outbox, and a
request the edge answered itself is stored once, as its FALLBACK."""

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from cloud.feedback.receipts import ReceiptKey, escalation_record, issue
from cloud.feedback.store import FeedbackStore
from cloud.registry.models import ModelRegistry
from cloud.registry.service import FleetServicer
from edge.config import CloudLinkConfig, FeedbackConfig, PolicyConfig
from edge.outbox import Outbox
from tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc, expert_pb2, expert_pb2_grpc, fleet_pb2

from .conftest import ROUTES, daemon_process, running_daemon, serving

pytestmark = pytest.mark.integration

TASK = "banking77"
DEVICE = "kiosk-r"


class SigningCloud(expert_pb2_grpc.ExpertServicer, FleetServicer):
    """An expert answering every escalation with a receipt under `key` after `delay_s`, and
    the real Fleet servicer, whose ReportFeedback answers UNAVAILABLE while `fleet_up` is False."""

    def __init__(self, root: Path, key: ReceiptKey) -> None:
        # Plaintext, as development clouds: the device is the one its messages name.
        FleetServicer.__init__(self, FeedbackStore(str(root / "feedback")), ModelRegistry(root / "models"),
                               routes=ROUTES, insecure=True, receipt_key=key)
        self.store = FeedbackStore(str(root / "feedback"))
        self.key = key
        self.fleet_up = True
        self.delay_s = 0.0

    async def Escalate(self, request: expert_pb2.EscalateRequest, context: Any) -> expert_pb2.EscalateResponse:
        await asyncio.sleep(self.delay_s)
        answer = expert_pb2.EscalateResponse(
            request_id=request.request_id, label="card_arrival", confidence=0.97, expert="scripted",
            distribution=[common_pb2.LabelScore(label="card_arrival", probability=0.97)])
        answer.receipt.CopyFrom(issue(escalation_record(request, answer, int(time.time() * 1000)), self.key))
        return answer

    async def ReportFeedback(self, request: fleet_pb2.ReportFeedbackRequest, grpc_context: Any) -> fleet_pb2.ReportFeedbackResponse:
        if not self.fleet_up:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details("feedback store down (test)")
            return fleet_pb2.ReportFeedbackResponse()
        return await super().ReportFeedback(request, grpc_context)

    def rows(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.store.read(TASK).to_pylist() if r["request_id"] == request_id]


@contextlib.asynccontextmanager
async def signing_cloud(tmp_path: Path) -> AsyncIterator[tuple[SigningCloud, str]]:
    cloud = SigningCloud(tmp_path / "cloud", ReceiptKey(b"r" * 32))
    async with serving(cloud) as target:
        yield cloud, target


def _outbox(path: Path) -> list[fleet_pb2.FeedbackRecord]:
    outbox = Outbox(path, max_records=1)
    try:
        return outbox.oldest(1000)
    finally:
        outbox.close()


async def _until(condition: Any, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_an_answered_escalation_survives_a_killed_edge_and_is_stored_once_as_the_expert_signed_it(
    student_dir: Path, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.sqlite3"
    config = tmp_path / "edge.yaml"
    async with signing_cloud(tmp_path) as (cloud, target):
        config.write_text(yaml.safe_dump({
            "listen": "127.0.0.1:0", "metrics_port": None, "tasks": {TASK: str(student_dir)}, "device_id": DEVICE,
            "policy": {"mode": "cloud_only"}, "cloud": {"target": target, "insecure": True},
            "feedback": {"outbox": str(outbox), "audit_rate": 0.0, "min_backoff_s": 0.05, "max_backoff_s": 0.2},
        }))
        cloud.fleet_up = False  # nothing leaves the outbox
        async with daemon_process(config) as (server, stub):
            answer = await stub.Infer(edge_pb2.InferRequest(task=TASK, text=b"card never came, mail a@b.com",
                                                            request_id="esc-1"), timeout=10)
            assert (answer.source, answer.label) == (edge_pb2.CLOUD, "card_arrival")
            server.process.send_signal(signal.SIGKILL)  # answered, so committed: nothing else holds it
            assert await asyncio.to_thread(server.process.wait, 30) == -signal.SIGKILL
        (kept,) = _outbox(outbox)
        assert kept.kind == fleet_pb2.ESCALATION and kept.record_id.startswith(f"esc/{DEVICE}/") and kept.receipt.mac
        assert cloud.rows("esc-1") == []

        cloud.fleet_up = True
        async with daemon_process(config):  # restarted: it delivers what it kept
            await _until(lambda: cloud.rows("esc-1"))
        await _until(lambda: not _outbox(outbox))
    (row,) = cloud.rows("esc-1")
    assert (row["kind"], row["record_id"], row["device_id"]) == ("ESCALATION", kept.record_id, DEVICE)
    # The expert's label, and the text as the edge sent it: redacted on the device.
    assert (row["label"], row["expert"], row["text"]) == ("card_arrival", "scripted", "card never came, mail [EMAIL]")
    assert row["edge_model_version"] == answer.model_version


async def test_an_escalation_past_the_edges_deadline_is_stored_once_as_its_fallback(
    student_dir: Path, tmp_path: Path
) -> None:
    """Before, the expert recorded its late answer beside the edge's FALLBACK: the request twice."""
    async with signing_cloud(tmp_path) as (cloud, target):
        cloud.delay_s = 1.0  # the expert answers, after the edge's deadline
        fields = {"policy": PolicyConfig(mode="cloud_only"), "device_id": DEVICE,
                  "cloud": CloudLinkConfig(target=target, insecure=True, deadline_ms=300),
                  "feedback": FeedbackConfig(outbox=tmp_path / "outbox.sqlite3", audit_rate=0.0)}
        async with running_daemon(student_dir, **fields) as (_, stub):
            answer = await stub.Infer(edge_pb2.InferRequest(task=TASK, text=b"where is my card", request_id="late-1"),
                                      timeout=10)
            assert (answer.source, answer.reason) == (edge_pb2.EDGE_FALLBACK, "cloud_deadline_exceeded")
            await asyncio.sleep(1.5)  # the expert's late answer has come and gone
        # Stopping delivered what waited (linger_s notwithstanding).
        rows = cloud.rows("late-1")
    assert [(r["kind"], r["device_id"]) for r in rows] == [("FALLBACK", DEVICE)]
    assert not _outbox(tmp_path / "outbox.sqlite3")
