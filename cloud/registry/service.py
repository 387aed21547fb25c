"""`tandem.v1.Fleet`: feedback in, signed students out, and each task's expert application.

The methods take `(request, grpc_context)` and touch the context only through `set_code`
and `set_details`, so one class serves both on a plain grpc.aio server (which passes the
context positionally) and as a Ray Serve deployment (which passes a RayServegRPCContext by
the keyword `grpc_context`; see `cloud.app.Fleet`).
"""

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cloud.errors import FleetError, FleetTimeout, InvalidFeedback, NotFound, StoreUnavailable
from cloud.feedback.records import KINDS, check
from cloud.feedback.store import READ_ERRORS, FeedbackStore
from cloud.registry.models import ModelNotFound, ModelRegistry
from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE
from tandem.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 10
REQUEST_TIMEOUT_S = 30.0

T = TypeVar("T")


class FleetMetrics:
    """What the servicer counts; this base counts nothing (`cloud.app` exports to Prometheus)."""

    def request(self, method: str, code: grpc.StatusCode) -> None:
        """One RPC answered with `code`."""

    def feedback(self, task: str, kind: str, outcome: str, count: int) -> None:
        """`count` (> 0) records of a task and kind were `stored` or a `duplicate`."""

    def quarantined(self, task: str, path: str) -> None:
        """The feedback store set aside an unreadable file of `task` (FeedbackStore's `on_quarantine`)."""


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    """ReportFeedback into a FeedbackStore; GetManifest and FetchModel from a ModelRegistry;
    GetRoutes from the cloud's task -> expert map."""

    def __init__(self, feedback: FeedbackStore, models: ModelRegistry, tasks: Mapping[str, Collection[str]] | None = None,
                 routes: Mapping[str, str] | None = None, metrics: FleetMetrics | None = None, max_batch: int = 1000,
                 chunk_bytes: int = CHUNK_BYTES, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        """`tasks` (task -> labels), where given, refuses feedback of other tasks or labels.
        `routes`: task -> the Serve application of its expert. `request_timeout_s`: the longest
        one step of an RPC's server-side work may take (storing a batch, reading a manifest or
        a chunk) before DEADLINE_EXCEEDED."""
        self._feedback = feedback
        self._models = models
        self._tasks = tasks
        self._routes = fleet_pb2.Routes(applications=routes or {})
        self._metrics = metrics or FleetMetrics()
        self._max_batch = max_batch
        self._chunk_bytes = chunk_bytes
        self._timeout_s = request_timeout_s

    async def ReportFeedback(self, request: fleet_pb2.ReportFeedbackRequest, grpc_context: Any) -> fleet_pb2.ReportFeedbackResponse:
        try:
            if len(request.records) > self._max_batch:
                raise InvalidFeedback("records", f"{len(request.records)} records exceed the batch limit of {self._max_batch}")
            check(request.records, self._tasks)
            stored, duplicates = await self.store(request.records)
        except FleetError as exc:
            self._refuse("ReportFeedback", exc, grpc_context)
            return fleet_pb2.ReportFeedbackResponse()
        self._metrics.request("ReportFeedback", grpc.StatusCode.OK)
        return fleet_pb2.ReportFeedbackResponse(stored=stored, duplicates=duplicates)

    async def GetRoutes(self, request: fleet_pb2.GetRoutesRequest, grpc_context: Any) -> fleet_pb2.Routes:
        self._metrics.request("GetRoutes", grpc.StatusCode.OK)
        return self._routes

    async def GetManifest(self, request: fleet_pb2.GetManifestRequest, grpc_context: Any) -> fleet_pb2.ModelManifest:
        try:
            manifest = await self._bounded("reading the manifest", self._manifest, request.task)
        except FleetError as exc:
            self._refuse("GetManifest", exc, grpc_context)
            return fleet_pb2.ModelManifest()
        self._metrics.request("GetManifest", grpc.StatusCode.OK)
        return manifest

    async def FetchModel(self, request: fleet_pb2.FetchModelRequest, grpc_context: Any) -> AsyncIterator[fleet_pb2.ModelChunk]:
        """The manifest and its signature first, then every file the manifest lists. An empty
        version means the promoted one."""
        try:
            directory, names = await self._bounded("reading the manifest", self._files, request.task, request.version)
            for name in names:
                async for chunk in self._chunks(directory / name):
                    yield chunk
        except FleetError as exc:
            self._refuse("FetchModel", exc, grpc_context)
            return
        self._metrics.request("FetchModel", grpc.StatusCode.OK)

    def _files(self, task: str, version: str) -> tuple[Path, list[str]]:
        """The directory of a version and the names FetchModel sends, in order."""
        _, directory = self._resolve(task, version)
        with _registry_io():
            return directory, [MANIFEST_FILE, SIGNATURE_FILE, *json.loads((directory / MANIFEST_FILE).read_bytes())["files"]]

    def _manifest(self, task: str) -> fleet_pb2.ModelManifest:
        version, directory = self._resolve(task, "")
        with _registry_io():
            manifest_json = (directory / MANIFEST_FILE).read_bytes()
            files = json.loads(manifest_json)["files"]
            return fleet_pb2.ModelManifest(
                task=task,
                version=version,
                manifest_json=manifest_json,
                signature=(directory / SIGNATURE_FILE).read_bytes(),
                files=[fleet_pb2.ModelFile(name=name, size=f["size"], sha256=f["sha256"]) for name, f in files.items()],
            )

    async def store(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> tuple[int, int]:
        """(stored, duplicates) of valid records, or StoreUnavailable."""
        try:
            new = await self._bounded("storing feedback", self._feedback.add, records)
        except READ_ERRORS as exc:  # the store quarantines files it cannot parse: these are I/O failures
            raise StoreUnavailable(f"feedback store failed: {type(exc).__name__}: {exc}") from exc
        self._count(records, new)
        return len(new), len(records) - len(new)

    def _resolve(self, task: str, version: str) -> tuple[str, Path]:
        try:
            version = version or self._models.promoted(task) or ""
            if not version:
                raise NotFound(f"task {task!r} has no promoted model")
            return version, self._models.path(task, version)
        except ModelNotFound as exc:
            raise NotFound(str(exc)) from exc

    async def _chunks(self, path: Path) -> AsyncIterator[fleet_pb2.ModelChunk]:
        offset = 0
        with _registry_io(), path.open("rb") as f:
            while True:
                data = await self._bounded(f"reading {path.name}", f.read, self._chunk_bytes)
                if data or not offset:  # an empty file still arrives, as one empty chunk
                    yield fleet_pb2.ModelChunk(file=path.name, offset=offset, data=data)
                offset += len(data)
                if len(data) < self._chunk_bytes:
                    return

    async def _bounded(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` in a thread, or FleetTimeout once it has taken `request_timeout_s`: a
        hung disk or store must not hold the RPC, and the deployment's slot, indefinitely. The
        thread runs on (Python cannot stop one); a FeedbackStore write it finishes later is
        deduplicated when the edge retries."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(call, *args), self._timeout_s)
        except TimeoutError:
            raise FleetTimeout(f"{what} took longer than the request timeout of {self._timeout_s:g} s") from None

    def _refuse(self, method: str, exc: FleetError, grpc_context: Any) -> None:
        """The one place fleet errors become statuses."""
        # Tracebacks for server-side failures; a bad request, or a timeout's wait, is not worth one.
        quiet = isinstance(exc, (InvalidFeedback, NotFound, FleetTimeout))
        log.warning("%s failed: %s %s", method, exc.code.name, exc, exc_info=not quiet)
        self._metrics.request(method, exc.code)
        grpc_context.set_code(exc.code)
        grpc_context.set_details(str(exc))

    def _count(self, records: Sequence[fleet_pb2.FeedbackRecord], new: list[fleet_pb2.FeedbackRecord]) -> None:
        stored = Counter((r.task, KINDS[r.kind]) for r in new)
        duplicates = Counter((r.task, KINDS[r.kind]) for r in records) - stored  # keeps counts > 0
        for outcome, counts in (("stored", stored), ("duplicate", duplicates)):
            for (task, kind), count in counts.items():
                self._metrics.feedback(task, kind, outcome, count)


@contextlib.contextmanager
def _registry_io() -> Iterator[None]:
    """A registry volume that fails to read (a shared NFS mount) or a published version whose
    manifest is damaged: UNAVAILABLE, so edges keep their model and poll again later."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise StoreUnavailable(f"model registry read failed: {type(exc).__name__}: {exc}") from exc
