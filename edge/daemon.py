"""Assembling and running the edge daemon: students, gRPC server, health, metrics,
the feedback outbox and its delivery, and the model updater."""

import asyncio
import functools
import logging
import signal
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from edge.cloud_client import CloudClient
from edge.config import EdgeConfig, FeedbackConfig
from edge.delivery import Delivery
from edge.errors import ArtifactError
from edge.faults import set_aside
from edge.feedback import FeedbackRecorder
from edge.health import DELIVERY, UPDATER, LoopHealth
from edge.metrics import EdgeMetrics
from edge.model_store import ModelStore
from edge.outbox import Outbox
from edge.redact import Redactor
from edge.runtime import Serving, TaskRuntime
from edge.server import bind, edge_server
from edge.service import build_service
from edge.student import SessionOptions, Student
from edge.updater import Updater
from tandem.signing import KeyringFile, VerificationError
from tandem.v1 import edge_pb2, edge_pb2_grpc
from tandem.wire import lenient

log = logging.getLogger(__name__)

# SQLite's verdicts on a damaged file (not one that is locked, missing or unreadable).
CORRUPT = frozenset({"SQLITE_NOTADB", "SQLITE_CORRUPT"})
SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["Edge"].full_name


class EdgeDaemon:
    """The daemon's lifecycle: `start()` loads every student and binds; `stop()` drains."""

    def __init__(self, cfg: EdgeConfig, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = EdgeMetrics(self.registry)
        self._cloud: CloudClient | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._tasks: dict[str, TaskRuntime] = {}
        self._outbox: Outbox | None = None
        self._feedback: FeedbackRecorder | None = None
        self._delivery: Delivery | None = None
        self._background: list[asyncio.Task[None]] = []
        self.updater: Updater | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """Where the local API answers, once started: `port <n>` or the unix:// socket."""
        return f"port {self.port}" if self.cfg.socket_path is None else f"unix://{self.cfg.socket_path}"

    @property
    def tasks(self) -> dict[str, TaskRuntime]:
        """What serves each task, once started."""
        return self._tasks

    async def start(self) -> int:
        """Loads the students (raising ArtifactError on a bad one), then serves. Returns the port.
        On failure, whatever was already started is stopped before the error propagates."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> int:
        cfg = self.cfg
        options = SessionOptions(cfg.intra_op_threads, cfg.allow_spinning)
        store = self._model_store()
        students: dict[str, Student] = {}
        for task, configured in cfg.tasks.items():
            if store is None:
                students[task] = Student.load(configured, options)
                continue
            # With the updater on, the configured artifact must verify too: the updater's checks
            # mean nothing if a swapped file on disk serves unchecked after a restart.
            pulled = await asyncio.to_thread(store.pulled_dirs, task)
            load = functools.partial(_verified_student, store, task, options)
            students[task] = _load_first(load, [*pulled, configured])
        if cfg.cloud.target is not None:
            self._cloud = CloudClient(cfg.cloud, cfg.device_id)
        if self._cloud is not None and cfg.feedback.outbox is not None:
            await self._start_feedback(cfg.feedback.outbox, self._cloud)
        # Batchers start last: what `stop` must release is in `self._tasks` from here on.
        servings = {task: Serving.start(student, cfg.max_batch, cfg.max_queue) for task, student in students.items()}
        service = build_service(cfg, servings, self.metrics, self._cloud, self._feedback)
        self._tasks = service.tasks
        for task, student in students.items():
            self.metrics.model.labels(task, student.version).set(1)
        if self._cloud is not None and store is not None:  # the config requires a cloud for the updater
            health = self._loop_health(UPDATER)
            await health.start()
            load_verified = functools.partial(Student, options=options)
            self.updater = Updater(cfg.updater, store, self._cloud, self._tasks, load_verified, self.metrics, health)
            self._run_in_background(self.updater.run())
        self._server = edge_server(cfg)
        lenient(edge_pb2_grpc.add_EdgeServicer_to_server)(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = bind(self._server, cfg)
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("edge daemon serving %s on %s", sorted(self._tasks), self.address)
        return self.port

    async def _start_feedback(self, path: Path, cloud: CloudClient) -> None:
        """The outbox and its delivery. A corrupt or unreadable outbox must not take inference
        down: it is set aside, counted, and delivery reports NOT_SERVING until a delivery works;
        if no outbox opens at all, the daemon serves without feedback."""
        health = self._loop_health(DELIVERY)
        try:
            outbox, faulty = await asyncio.to_thread(self._open_outbox, path)
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot open the feedback outbox %s; serving without feedback: %s", path, exc)
            self.metrics.storage_faults.labels("outbox").inc()
            await health.start(serving=False)
            return
        if faulty:
            self.metrics.storage_faults.labels("outbox").inc()
        await health.start(serving=not faulty)
        self._outbox = outbox
        self.metrics.outbox_depth.set_function(lambda: outbox.depth)
        self.metrics.dead_records.set_function(lambda: outbox.dead_count)
        self._delivery = delivery = Delivery(outbox, cloud, self.cfg.feedback, self.metrics, health)
        redact = Redactor(self.cfg.redaction)
        self._feedback = FeedbackRecorder(
            outbox, redact, self.cfg.device_id, self.cfg.feedback.audit_rate, self.metrics, delivery.wake,
            audit_weighting=self.cfg.feedback.audit_weighting,
        )
        self._run_in_background(delivery.run())

    def _open_outbox(self, path: Path) -> tuple[Outbox, bool]:
        """The outbox, and whether the file there was corrupt (then set aside with its WAL,
        never deleted, and a fresh outbox opened in its place)."""
        try:
            return _outbox(path, self.cfg.feedback), False
        except sqlite3.DatabaseError as exc:
            # Only a damaged file is set aside: a locked or unopenable one is fine, and raises.
            if exc.sqlite_errorname not in CORRUPT:
                raise
            log.error("the feedback outbox %s is corrupt; its records stay in the file set aside: %s", path, exc)
        for suffix in ("", "-wal", "-shm"):
            set_aside(path.with_name(path.name + suffix))
        return _outbox(path, self.cfg.feedback), True

    def _loop_health(self, service: str) -> LoopHealth:
        return LoopHealth(service, self._health, self.cfg.loop_health, self.metrics)

    def _model_store(self) -> ModelStore | None:
        """Where pulled versions live, when the updater is on (the config then names a keyring)."""
        cfg = self.cfg.updater
        if not cfg.enabled or cfg.keyring is None:
            return None
        corrupt = self.metrics.storage_faults.labels("model_state").inc
        return ModelStore(cfg.models_dir, KeyringFile(cfg.keyring).current, corrupt)

    def _run_in_background(self, loop: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(loop)
        task.add_done_callback(_report_crash)
        self._background.append(task)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Reports NOT_SERVING, finishes in-flight requests, sends the feedback that waits
        (for at most `grace_s` more), then releases everything. Undelivered feedback stays in
        the outbox for the next start."""
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._feedback is not None:
            await self._feedback.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._delivery is not None and grace_s > 0:
            await self._delivery.flush(grace_s)
        for runtime in self._tasks.values():
            await runtime.close()
        if self._outbox is not None:
            await asyncio.to_thread(self._outbox.close)
        if self._cloud is not None:
            await self._cloud.close()


def _outbox(path: Path, cfg: FeedbackConfig) -> Outbox:
    return Outbox(path, cfg.max_records, cfg.max_bytes, cfg.max_dead, cfg.journal_size_limit_bytes)


def _verified_student(store: ModelStore, task: str, options: SessionOptions, directory: Path) -> Student:
    """The artifact at `directory`, built from the bytes verified against the keyring."""
    try:
        manifest, files = store.verified(task, directory)
    except VerificationError as exc:
        raise ArtifactError(f"refused, it does not verify against updater.keyring: {exc}") from exc
    return Student(manifest, files, options, str(directory))


def _load_first(load: Callable[[Path], Student], directories: list[Path]) -> Student:
    """The first directory that loads; the last one's error if none does."""
    for directory in directories[:-1]:
        try:
            return load(directory)
        except ArtifactError as exc:  # e.g. a pulled version this ONNX Runtime cannot run
            log.error("cannot serve %s, trying the next candidate: %s", directory, exc)
    return load(directories[-1])


def _report_crash(task: asyncio.Task[None]) -> None:
    """A background loop that ends other than by cancellation is a bug: say so loudly."""
    if not task.cancelled():
        log.error("background task %s stopped", task.get_coro(), exc_info=task.exception())


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """Prometheus on `host:port`, in a daemon thread; the server, to shut down."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server


def redrive(cfg: EdgeConfig) -> tuple[int, int]:
    """`tandem edge redrive`: moves the outbox's dead records back into it, oldest first and
    within its bounds, once the cloud's cause is fixed. Returns (moved, still dead). A running
    daemon sends them at its next delivery (it wakes for the next record it keeps), a stopped
    one after it starts."""
    path = cfg.feedback.outbox
    if path is None or not path.is_file():
        return 0, 0
    outbox = _outbox(path, cfg.feedback)
    try:
        return outbox.redrive()
    finally:
        outbox.close()


def run_daemon(cfg: EdgeConfig) -> None:
    """Runs until SIGTERM or SIGINT (`tandem edge serve`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(cfg))


async def _serve(cfg: EdgeConfig) -> None:
    daemon = EdgeDaemon(cfg)
    await daemon.start()
    metrics = None
    if cfg.metrics_port is not None:
        try:
            metrics = serve_metrics(cfg.metrics_port, cfg.metrics_host, daemon.registry)
        except OSError:
            await daemon.stop(grace_s=0)
            raise
    # One parseable line: scripts and tests that bind port 0 learn the real port.
    print(f"tandem edge listening on {daemon.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if daemon.updater is not None:
        loop.add_signal_handler(signal.SIGHUP, daemon.updater.wake)
    await stop.wait()
    await daemon.stop()
    if metrics is not None:  # scraped until the end: the last scrape sees the stop's counts
        metrics.shutdown()
