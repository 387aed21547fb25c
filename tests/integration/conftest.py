import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
import pytest_asyncio

from tandem.tasks import read_examples
from tandem.v1 import common_pb2, edge_pb2_grpc, expert_pb2, expert_pb2_grpc, fleet_pb2, fleet_pb2_grpc

if TYPE_CHECKING:
    from edge.student import Student
    from tandem.subprocesses import Server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def student_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The private key that signs `student_dir` (its public key is `<name>.pub`)."""
    from tandem.signing import generate_key

    path = tmp_path_factory.mktemp("keys") / "student.pem"
    generate_key(path)
    return path


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory: pytest.TempPathFactory, student_key: Path, teacher_dir: Path) -> Path:
    """A real student, trained briefly by the project's own pipeline (about a minute), signed
    with `student_key`; its threshold fitted against `teacher_dir` as the expert."""
    from cloud.training.config import FitConfig, TrainConfig
    from cloud.training.student import train_student

    out = tmp_path_factory.mktemp("models") / "student"
    cfg = TrainConfig(student=FitConfig(layers=2, lr=5e-4, epochs=2, max_examples=3000), signing_key=student_key,
                      output_dir=teacher_dir.parent)
    train_student(cfg, out)
    return out


@pytest.fixture()
def artifact_copy(student_dir: Path, tmp_path: Path) -> Path:
    """A copy of the student that a test may damage."""
    return Path(shutil.copytree(student_dir, tmp_path / "student"))


# The scripted cloud's expert application for banking77.
ROUTES = {"banking77": "banking77-expert"}


class ScriptedCloud(expert_pb2_grpc.ExpertServicer, fleet_pb2_grpc.FleetServicer):
    """A real gRPC cloud whose behaviour a test sets. Escalate: `mode` is answer, slow,
    overloaded or unavailable_once (UNAVAILABLE to the first call, answers after); a call for
    an application not in `routes` gets NOT_FOUND. Fleet: GetRoutes answers `routes`; the other
    Fleet methods are unimplemented."""

    def __init__(self) -> None:
        self.mode = "answer"
        self.routes = dict(ROUTES)
        self.seen: list[tuple[expert_pb2.EscalateRequest, dict[str, str]]] = []
        self.routes_asked: list[dict[str, str]] = []

    async def Escalate(self, request: expert_pb2.EscalateRequest, context: grpc.aio.ServicerContext) -> expert_pb2.EscalateResponse:
        metadata = dict(context.invocation_metadata())
        self.seen.append((request, metadata))
        if metadata.get("application") not in self.routes.values():  # as Serve's proxy answers
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Application {metadata.get('application')!r} not found.")
        if self.mode == "slow":
            await asyncio.sleep(5)
        if self.mode == "unavailable_once" and len(self.seen) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if self.mode == "overloaded":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return expert_pb2.EscalateResponse(
            request_id=request.request_id,
            label="card_arrival",
            confidence=0.97,
            distribution=[common_pb2.LabelScore(label="card_arrival", probability=0.97)],
            expert="scripted",
            expert_ms=1.0,
        )

    async def GetRoutes(self, request: fleet_pb2.GetRoutesRequest, context: grpc.aio.ServicerContext) -> fleet_pb2.Routes:
        self.routes_asked.append(dict(context.invocation_metadata()))
        return fleet_pb2.Routes(applications=self.routes)


@contextlib.asynccontextmanager
async def serving(servicer: expert_pb2_grpc.ExpertServicer | fleet_pb2_grpc.FleetServicer, port: int = 0) -> AsyncIterator[str]:
    """A real grpc.aio server for an Expert servicer, a Fleet servicer, or one that is both;
    yields its address."""
    server = grpc.aio.server()
    if isinstance(servicer, expert_pb2_grpc.ExpertServicer):
        expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    if isinstance(servicer, fleet_pb2_grpc.FleetServicer):
        fleet_pb2_grpc.add_FleetServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def serve_cloud(port: int = 0) -> AsyncIterator[tuple[ScriptedCloud, str]]:
    servicer = ScriptedCloud()
    async with serving(servicer, port) as target:
        yield servicer, target


@pytest_asyncio.fixture()
async def cloud() -> AsyncIterator[tuple[ScriptedCloud, str]]:
    async with serve_cloud() as pair:
        yield pair


@contextlib.asynccontextmanager
async def running_daemon(student_dir: Path, **fields: object) -> AsyncIterator[tuple[object, edge_pb2_grpc.EdgeStub]]:
    """An in-process EdgeDaemon on a free port and a stub connected to it; its feedback outbox
    is a temporary file unless `feedback` is given."""
    from edge.config import EdgeConfig, FeedbackConfig
    from edge.daemon import EdgeDaemon

    with tempfile.TemporaryDirectory() as tmp:
        fields.setdefault("feedback", FeedbackConfig(outbox=Path(tmp) / "outbox.sqlite3"))
        cfg = EdgeConfig(listen="127.0.0.1:0", metrics_port=None, tasks={"banking77": student_dir}, **fields)
        daemon = EdgeDaemon(cfg)
        port = await daemon.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield daemon, edge_pb2_grpc.EdgeStub(channel)
        finally:
            await channel.close()
            await daemon.stop(grace_s=1)


class GatedStudent:
    """A real student whose model runs wait for `release`; remembers every text it ran."""

    def __init__(self, student: "Student") -> None:
        self.student = student
        self.manifest = student.manifest
        self.version = student.version
        self.labels = student.labels
        self.out_of_scope = student.out_of_scope
        self.release = threading.Event()
        self.entered = threading.Event()
        self.ran: list[str] = []

    def predict(self, texts: list[str]) -> np.ndarray:
        """Waits for `release` (at most 30 s, so a failing test cannot hang the suite)."""
        self.entered.set()
        self.release.wait(timeout=30)
        self.ran.extend(texts)
        return self.student.predict(texts)


@pytest.fixture(scope="session")
def banking_texts() -> list[str]:
    """The first 200 queries of the banking77 test split."""
    path = Path(os.environ["TANDEM_DATA_DIR"]) / "banking77" / "test.csv"
    return [e.text for e in read_examples(path, "text", "category")[:200]]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real teacher (the classify expert's checkpoint), trained briefly by the project's own
    pipeline."""
    from cloud.training.config import FitConfig, TrainConfig
    from cloud.training.teacher import train_teacher

    out = tmp_path_factory.mktemp("models") / "teacher"
    train_teacher(TrainConfig(teacher=FitConfig(layers=2, lr=5e-4, epochs=1, max_examples=2000)), out)
    return out


@contextlib.asynccontextmanager
async def daemon_process(config: Path) -> AsyncIterator[tuple["Server", edge_pb2_grpc.EdgeStub]]:
    """`tandem edge serve --config CONFIG` as a subprocess, started and stopped off the event
    loop (a servicer the daemon calls may run on this loop)."""
    from benchmarks.system import edge_args
    from tandem.subprocesses import start_server, stop_server

    server = await asyncio.to_thread(start_server, edge_args(config))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield server, edge_pb2_grpc.EdgeStub(channel)
    finally:
        await channel.close()
        await asyncio.to_thread(stop_server, server)
