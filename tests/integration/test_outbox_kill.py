"""Outbox durability: `tandem edge serve` killed with SIGKILL, mid-delivery and mid-recording,
delivers every record it acknowledged exactly once to the real feedback store."""

import asyncio
import signal
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
import yaml

from cloud.feedback.store import FeedbackStore
from cloud.registry.models import ModelRegistry
from cloud.registry.service import FleetServicer
from tandem.v1 import edge_pb2, edge_pb2_grpc, fleet_pb2

from .conftest import daemon_process, serving

pytestmark = pytest.mark.integration

TASK = "banking77"


class SwitchedFleet(FleetServicer):
    """The real Fleet servicer behind a switch. `down`: ReportFeedback answers UNAVAILABLE
    and stores nothing. `kill_after_store`: stores the batch, then SIGKILLs `victim` before the
    OK leaves, and stores normally from then on. `up`: stores."""

    def __init__(self, store: FeedbackStore, root: Path) -> None:
        super().__init__(store, ModelRegistry(root / "models"), insecure=True)  # the edge is plaintext, as `kill-test`
        self.mode = "down"
        self.victim: subprocess.Popen[str] | None = None
        self.answers: list[fleet_pb2.ReportFeedbackResponse] = []

    async def ReportFeedback(self, request: fleet_pb2.ReportFeedbackRequest, grpc_context: Any) -> fleet_pb2.ReportFeedbackResponse:
        if self.mode == "down":
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details("feedback store down (test)")
            return fleet_pb2.ReportFeedbackResponse()
        answer = await super().ReportFeedback(request, grpc_context)
        self.answers.append(answer)
        if self.mode == "kill_after_store" and self.victim is not None:
            self.victim.send_signal(signal.SIGKILL)
            self.mode = "up"
        return answer


def _config(tmp_path: Path, student_dir: Path, target: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "metrics_port": None, "tasks": {TASK: str(student_dir)}, "device_id": "kill-test",
        # The Fleet servicer names no expert for the task (GetRoutes): every answer is a fallback.
        "policy": {"mode": "cloud_only"}, "cloud": {"target": target, "insecure": True},
        "feedback": {"outbox": str(tmp_path / "outbox.sqlite3"), "batch_size": 16, "audit_rate": 0.0,
                     "min_backoff_s": 0.05, "max_backoff_s": 0.2},
    }))
    return path


async def _feedback(stub: edge_pb2_grpc.EdgeStub, i: int) -> str:
    """One fallback (even i) or correction (odd i), with request id `q-<i>`; returns the id."""
    if i % 2:
        await stub.Correct(edge_pb2.CorrectRequest(task=TASK, text=f"card {i} never arrived".encode(),
                                                   label="card_arrival", request_id=f"q-{i}"), timeout=10)
    else:
        response = await stub.Infer(edge_pb2.InferRequest(task=TASK, text=f"where is card {i}".encode(),
                                                          request_id=f"q-{i}"), timeout=10)
        assert response.source == edge_pb2.EDGE_FALLBACK
    return f"q-{i}"


async def _answered(stub: edge_pb2_grpc.EdgeStub, ids: range, concurrency: int = 8) -> list[str]:
    """The request ids whose feedback call succeeded; the others failed (the daemon died)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> str | None:
        async with slots:
            try:
                return await _feedback(stub, i)
            except grpc.aio.AioRpcError:
                return None

    return [r for r in await asyncio.gather(*(one(i) for i in ids)) if r is not None]


def _waiting(outbox: Path) -> int:
    db = sqlite3.connect(outbox)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


async def _until(condition, timeout_s: float = 60) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


async def test_sigkill_mid_delivery_and_mid_recording_stores_every_acknowledged_record_once(
    student_dir: Path, tmp_path: Path
) -> None:
    store = FeedbackStore(str(tmp_path / "cloud" / "feedback"))
    fleet = SwitchedFleet(store, tmp_path / "cloud")
    outbox = tmp_path / "outbox.sqlite3"
    async with serving(fleet) as target:
        config = _config(tmp_path, student_dir, target)

        # 1. The store is down: 160 records pile up. Then it stores one batch, and the daemon
        #    is killed after the store wrote it but before the daemon saw the OK.
        async with daemon_process(config) as (server, stub):
            acknowledged = await _answered(stub, range(160))
            assert len(acknowledged) == 160 and _waiting(outbox) == 160
            fleet.victim, fleet.mode = server.process, "kill_after_store"
            assert await asyncio.to_thread(server.process.wait, 30) == -signal.SIGKILL
        assert [a.stored for a in fleet.answers] == [16] and _waiting(outbox) == 160

        # 2. The store is down again; the daemon is killed while corrections and fallbacks
        #    are being recorded, some answered, some in flight.
        fleet.mode = "down"
        async with daemon_process(config) as (server, stub):
            recording = asyncio.ensure_future(_answered(stub, range(160, 400)))
            await _until(lambda: _waiting(outbox) >= 220)
            server.process.kill()
            survivors = await recording
        assert 0 < len(survivors) < 240, "the second kill must land mid-recording"
        acknowledged += survivors

        # 3. The store is up: a restarted daemon delivers everything left.
        fleet.mode = "up"
        async with daemon_process(config):
            await _until(lambda: _waiting(outbox) == 0)

    table = store.read(TASK)
    stored = Counter(table["request_id"].to_pylist())
    raw_rows = sum(pq.read_metadata(f).num_rows for f in (tmp_path / "cloud" / "feedback").rglob("*.parquet"))
    assert all(stored[r] == 1 for r in acknowledged), "an acknowledged record was lost or duplicated"
    assert max(stored.values()) == 1 and set(stored) <= {f"q-{i}" for i in range(400)}
    assert raw_rows == table.num_rows == sum(a.stored for a in fleet.answers), "a record was written twice"
    assert sum(a.duplicates for a in fleet.answers) == 16, "the batch killed before its OK was re-sent"
    kinds = Counter(table["kind"].to_pylist())
    assert kinds["FALLBACK"] > 0 and kinds["CORRECTION"] > 0 and set(table["device_id"].to_pylist()) == {"kill-test"}
