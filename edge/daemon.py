"""Assembling and running the edge daemon: students, gRPC server, health, metrics."""

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from edge.batcher import MicroBatcher
from edge.cloud_client import Escalator, GrpcEscalator
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.policy import Policy
from edge.service import EdgeService, TaskRuntime
from edge.student import SessionOptions, Student
from tandem.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["Edge"].full_name


class EdgeDaemon:
    """The daemon's lifecycle: `start()` loads every student and binds; `stop()` drains."""

    def __init__(
        self,
        cfg: EdgeConfig,
        registry: CollectorRegistry | None = None,
        escalator: Escalator | None = None,
    ) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = EdgeMetrics(self.registry)
        self._escalator = escalator
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._tasks: dict[str, TaskRuntime] = {}
        self.port = 0

    async def start(self) -> int:
        """Loads the students (raising ArtifactError on a bad one), then serves. Returns the port.
        On failure, whatever was already started is stopped before the error propagates."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> int:
        options = SessionOptions(self.cfg.intra_op_threads, self.cfg.allow_spinning)
        for task, directory in self.cfg.tasks.items():
            student = Student(directory, options)
            batcher = MicroBatcher(student.predict, self.cfg.max_batch)
            batcher.start()
            self._tasks[task] = TaskRuntime(student, batcher, Policy(self.cfg.policy))
            self.metrics.model.labels(task, student.version).set(1)
        if self._escalator is None and self.cfg.cloud.target is not None:
            self._escalator = GrpcEscalator(self.cfg.cloud)
        service = EdgeService(self._tasks, self._escalator, self.metrics, self.cfg.max_text_bytes)
        self._server = grpc.aio.server()
        edge_pb2_grpc.add_EdgeServicer_to_server(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(self.cfg.listen)
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("edge daemon serving %s on port %d", sorted(self._tasks), self.port)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Reports NOT_SERVING, finishes in-flight requests, then releases everything."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
        for runtime in self._tasks.values():
            await runtime.batcher.close()
        if self._escalator is not None:
            await self._escalator.close()


def run_daemon(cfg: EdgeConfig) -> None:
    """Runs until SIGTERM or SIGINT (`tandem edge serve`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(cfg))


async def _serve(cfg: EdgeConfig) -> None:
    daemon = EdgeDaemon(cfg)
    port = await daemon.start()
    if cfg.metrics_port is not None:
        try:
            start_http_server(cfg.metrics_port, addr="127.0.0.1", registry=daemon.registry)
        except OSError:
            await daemon.stop(grace_s=0)
            raise
    # One parseable line: scripts and tests that bind port 0 learn the real port.
    print(f"tandem edge listening on port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await daemon.stop()
