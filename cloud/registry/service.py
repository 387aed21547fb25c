"""`tandem.v1.Fleet`: feedback in, signed students out, each task's expert application, and
edges' acknowledgements of the versions they serve.

Every RPC first identifies its caller (`cloud.identity.caller_device`: the device that the
TLS proxy verified). A device writes feedback only as itself: its own records under its own
ids (`dev/<device>/<record_id>`) within its daily quota, and the expert's records of its own
escalations only as the receipts the expert signed (`cloud.feedback.receipts`); it fetches
only promoted versions. Refusals and rollouts are appended to the audit log.

The methods take `(request, grpc_context)` and touch the context only through `set_code`
and `set_details`, so one class serves both on a plain grpc.aio server (which passes the
context positionally) and as a Ray Serve deployment (which passes a RayServegRPCContext by
the keyword `grpc_context`; see `cloud.app.Fleet`).
"""

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from cloud.audit.throttle import AuditThrottle
from cloud.errors import (FleetError, FleetTimeout, InvalidFeedback, InvalidRequest, NotFound, PermissionDenied,
                          QuotaExceeded, StoreUnavailable, UnauthenticatedFleetCall)
from cloud.feedback.quota import DEVICE_QUOTA_PER_DAY, DeviceQuota
from cloud.feedback.receipts import ReceiptKey, verify
from cloud.feedback.records import KINDS, LabelSet, check
from cloud.feedback.store import READ_ERRORS, FeedbackStore
from cloud.identity import Unauthenticated, caller_device, proxy_token
from cloud.registry.models import ModelNotFound, ModelRegistry
from cloud.registry.routes import RouteStore
from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE, FieldError, Manifest, Promotion, check_name
from tandem.v1 import fleet_pb2, fleet_pb2_grpc
from tandem.wire import Undecodable, parsed

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 10
REQUEST_TIMEOUT_S = 30.0
# Refusals that a caller's input earned (not the cloud's failures): audited.
REFUSALS = (InvalidFeedback, PermissionDenied, QuotaExceeded)
# At most one feedback_refused entry per device and status this often: a device that retries a
# refused batch in a loop must not grow the audit log at its request rate. The entry counts the
# refusals since the previous one (`suppressed`).
AUDIT_REFUSALS_EVERY_S = 60.0
AUDIT_ACTOR = "fleet"

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class Audit(Protocol):
    """Where the servicer appends audit entries (`cloud.audit.log.AuditLog`)."""

    def append(self, event: str, actor: str, **data: Any) -> dict[str, Any]: ...


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
    GetRoutes from the cloud's task -> expert map, through the RouteStore's serving versions
    where given; AckRollout into the audit log."""

    def __init__(self, feedback: FeedbackStore, models: ModelRegistry, tasks: Mapping[str, LabelSet] | None = None,
                 routes: Mapping[str, str] | None = None, metrics: FleetMetrics | None = None, max_batch: int = 1000,
                 chunk_bytes: int = CHUNK_BYTES, request_timeout_s: float = REQUEST_TIMEOUT_S, *, insecure: bool = False,
                 device_quota_per_day: int = DEVICE_QUOTA_PER_DAY, audit: Audit | None = None,
                 receipt_key: ReceiptKey | None = None, route_store: RouteStore | None = None) -> None:
        """`tasks` (task -> its label set), where given, refuses feedback of other tasks or labels.
        `routes`: task -> the Serve application of its expert; with `route_store`, task -> its
        expert, whose serving application (a rollout's version) the store names.
        `request_timeout_s`: the longest one step of an RPC's server-side work may take (storing
        a batch, reading a manifest or a chunk) before DEADLINE_EXCEEDED. `insecure` (development only): callers are who
        their messages say. `audit`, where given, receives refused feedback batches and
        acknowledged rollouts. `receipt_key` checks the receipts of ESCALATION records; without
        it, every ESCALATION record is refused."""
        self._feedback = feedback
        self._models = models
        self._tasks = tasks
        self._routes = dict(routes or {})
        self._route_store = route_store
        self._metrics = metrics or FleetMetrics()
        self._max_batch = max_batch
        self._chunk_bytes = chunk_bytes
        self._timeout_s = request_timeout_s
        self._proxy_token = proxy_token(insecure)
        self._audit = audit
        self._receipt_key = receipt_key
        self._quota = DeviceQuota(self._device_counts, device_quota_per_day)
        self._refusals = AuditThrottle(AUDIT_REFUSALS_EVERY_S)  # keyed by (device, status code)
        self._acked: dict[tuple[str, str], str] = {}  # (device, task) -> the version last audited
        if insecure:
            log.warning("fleet: insecure, development only: device ids are whatever the messages claim, unverified")

    async def ReportFeedback(self, request: fleet_pb2.ReportFeedbackRequest, grpc_context: Any) -> fleet_pb2.ReportFeedbackResponse:
        records: Sequence[fleet_pb2.FeedbackRecord] = ()
        device = ""
        try:
            records = _parsed(request).records
            device = self._caller(grpc_context, records[0].device_id if records else "")
            if len(records) > self._max_batch:
                raise InvalidFeedback("records", f"{len(records)} records exceed the batch limit of {self._max_batch}")
            records = _receipts_opened(records, device, self._receipt_key)
            check(records, self._tasks)
            _authorise(records, device)
            day = await self._quota.charge(device, _own(records))
            try:
                new = await self._store(records)
            except FleetError:
                self._quota.refund(device, _own(records), day)
                raise
            self._quota.refund(device, _own(records) - _own(new), day)  # the quota counts what is stored
        except FleetError as exc:
            self._refuse("ReportFeedback", exc, grpc_context)
            if isinstance(exc, REFUSALS):
                await self._audit_refusal(device, exc, len(records))
            return fleet_pb2.ReportFeedbackResponse()
        self._metrics.request("ReportFeedback", grpc.StatusCode.OK)
        return fleet_pb2.ReportFeedbackResponse(stored=len(new), duplicates=len(records) - len(new))

    async def GetRoutes(self, request: fleet_pb2.GetRoutesRequest, grpc_context: Any) -> fleet_pb2.Routes:
        try:
            _parsed(request)
            self._caller(grpc_context, "")
            routes = self._routes if self._route_store is None else await self._bounded(
                "reading the routes", self._serving_routes, self._route_store)
        except FleetError as exc:
            self._refuse("GetRoutes", exc, grpc_context)
            return fleet_pb2.Routes()
        self._metrics.request("GetRoutes", grpc.StatusCode.OK)
        return fleet_pb2.Routes(applications=routes)

    async def GetManifest(self, request: fleet_pb2.GetManifestRequest, grpc_context: Any) -> fleet_pb2.ModelManifest:
        """The promoted version's manifest, with its signature and its signed promotion."""
        try:
            request = _parsed(request)
            self._caller(grpc_context, "")
            _check_request("task", request.task)
            manifest = await self._bounded("reading the manifest", self._manifest, request.task)
        except FleetError as exc:
            self._refuse("GetManifest", exc, grpc_context)
            return fleet_pb2.ModelManifest()
        self._metrics.request("GetManifest", grpc.StatusCode.OK)
        return manifest

    async def FetchModel(self, request: fleet_pb2.FetchModelRequest, grpc_context: Any) -> AsyncIterator[fleet_pb2.ModelChunk]:
        """The manifest and its signature first, then every file the manifest lists, of the
        promoted version (an empty version means it): other versions, candidates the gate
        rejected among them, stay inside the cloud."""
        try:
            request = _parsed(request)
            self._caller(grpc_context, "")
            _check_request("task", request.task)
            if request.version:
                _check_request("version", request.version)
            directory, names = await self._bounded("reading the manifest", self._files, request.task, request.version)
            for name in names:
                async for chunk in self._chunks(directory / name):
                    yield chunk
        except FleetError as exc:
            self._refuse("FetchModel", exc, grpc_context)
            return
        self._metrics.request("FetchModel", grpc.StatusCode.OK)

    async def AckRollout(self, request: fleet_pb2.AckRolloutRequest, grpc_context: Any) -> fleet_pb2.AckRolloutResponse:
        """Audits that the calling device now serves a published version of a task; an
        acknowledgement the device repeats is audited once."""
        try:
            request = _parsed(request)
            device = self._caller(grpc_context, "")
            _check_request("task", request.task)
            _check_request("version", request.version)
            if self._tasks is not None and request.task not in self._tasks:
                raise InvalidRequest("task", f"unknown task {request.task!r}; the cloud has {sorted(self._tasks)}")
            await self._bounded("reading the registry", self._published, request.task, request.version)
            if self._acked.get((device, request.task)) != request.version:
                await self._append("rollout_ack", device=device, task=request.task, version=request.version)
                self._acked[(device, request.task)] = request.version
        except FleetError as exc:
            self._refuse("AckRollout", exc, grpc_context)
            return fleet_pb2.AckRolloutResponse()
        self._metrics.request("AckRollout", grpc.StatusCode.OK)
        return fleet_pb2.AckRolloutResponse()

    def _caller(self, grpc_context: Any, claimed: str) -> str:
        """The calling device (`cloud.identity.caller_device`)."""
        try:
            return caller_device(grpc_context.invocation_metadata(), claimed, self._proxy_token)
        except Unauthenticated as exc:
            raise UnauthenticatedFleetCall(str(exc)) from None
        except FieldError as exc:  # insecure: the id a message claims
            raise InvalidFeedback.of(exc) from None

    async def _device_counts(self, day: date) -> Counter[str]:
        """The quota's loader: records each device stored on `day`, bounded like every store
        read, its failures StoreUnavailable."""
        try:
            return await self._bounded("counting today's feedback", self._feedback.device_counts, day)
        except READ_ERRORS as exc:
            raise StoreUnavailable(f"feedback store failed: {type(exc).__name__}: {exc}") from exc

    async def _audit_refusal(self, device: str, exc: FleetError, count: int) -> None:
        """A `feedback_refused` entry, at most one per device and status per AUDIT_REFUSALS_EVERY_S.
        A failed append is logged, not answered: the caller's status is the refusal."""
        suppressed = self._refusals.admit((device, exc.code.name))
        if suppressed is None:
            return
        try:
            await self._append("feedback_refused", device=device, code=exc.code.name, field=getattr(exc, "field", ""),
                               count=count, suppressed=suppressed)
        except FleetError as failure:
            log.error("audit: feedback_refused of device %r not recorded: %s", device, failure)

    async def _append(self, event: str, **data: Any) -> None:
        if self._audit is None:
            return
        try:
            await self._bounded(f"appending {event} to the audit log", functools.partial(self._audit.append, event,
                                                                                         AUDIT_ACTOR, **data))
        except FleetError:
            raise
        except Exception as exc:  # whatever the audit log's filesystem raises
            raise StoreUnavailable(f"audit log append failed: {type(exc).__name__}: {exc}") from exc

    def _serving_routes(self, store: RouteStore) -> dict[str, str]:
        try:
            return store.routes(self._routes)
        except OSError as exc:
            raise StoreUnavailable(f"routes file {store.path}: {exc}") from exc

    def _published(self, task: str, version: str) -> None:
        try:
            self._models.path(task, version)
        except ModelNotFound as exc:
            raise NotFound(str(exc)) from None

    def _promoted(self, task: str) -> tuple[str, Path, bytes, bytes]:
        """The promoted version of `task`, its directory, and its signed promotion (JSON, signature)."""
        with _registry_io():
            try:
                promotion = self._models.promotion(task)
            except ModelNotFound as exc:
                raise NotFound(str(exc)) from None
            if promotion is None:
                raise NotFound(f"task {task!r} has no promoted model")
            promotion_json, signature = promotion
            version = Promotion.model_validate_json(promotion_json).version
        try:
            return version, self._models.path(task, version), promotion_json, signature
        except ModelNotFound as exc:
            raise StoreUnavailable(f"model registry: the promoted version is missing: {exc}") from None

    def _files(self, task: str, version: str) -> tuple[Path, list[str]]:
        """The directory of the promoted version and the names FetchModel sends, in order."""
        promoted, directory, _, _ = self._promoted(task)
        if version and version != promoted:
            raise NotFound(f"task {task!r} version {version!r} is not promoted; devices fetch only the promoted version")
        with _registry_io():
            return directory, [MANIFEST_FILE, SIGNATURE_FILE, *Manifest.read(directory).files]

    def _manifest(self, task: str) -> fleet_pb2.ModelManifest:
        version, directory, promotion_json, promotion_signature = self._promoted(task)
        with _registry_io():
            manifest_json = (directory / MANIFEST_FILE).read_bytes()
            files = Manifest.model_validate_json(manifest_json).files
            return fleet_pb2.ModelManifest(
                task=task,
                version=version,
                manifest_json=manifest_json,
                signature=(directory / SIGNATURE_FILE).read_bytes(),
                files=[fleet_pb2.ModelFile(name=name, size=f.size, sha256=f.sha256) for name, f in files.items()],
                promotion_json=promotion_json,
                promotion_signature=promotion_signature,
            )

    async def _store(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> list[fleet_pb2.FeedbackRecord]:
        """The records newly stored of valid, authorised `records` (the others were stored
        before), or StoreUnavailable."""
        try:
            new = await self._bounded("storing feedback", self._feedback.add, records)
        except READ_ERRORS as exc:  # the store quarantines files it cannot parse: these are I/O failures
            raise StoreUnavailable(f"feedback store failed: {type(exc).__name__}: {exc}") from exc
        self._count(records, new)
        return new

    async def _chunks(self, path: Path) -> AsyncIterator[fleet_pb2.ModelChunk]:
        offset = 0
        with _registry_io():
            while True:
                data = await self._bounded(f"reading {path.name}", _read_chunk, path, offset, self._chunk_bytes)
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
        # A refused request is the caller's business (counted, and logged at INFO, so that a
        # misbehaving client cannot fill the log); a server-side failure gets a traceback, and a
        # timeout a warning without one.
        refused = isinstance(exc, (*REFUSALS, InvalidRequest, UnauthenticatedFleetCall, NotFound))
        log.log(logging.INFO if refused else logging.WARNING, "%s failed: %s %s", method, exc.code.name, exc,
                exc_info=not (refused or isinstance(exc, FleetTimeout)))
        self._metrics.request(method, exc.code)
        grpc_context.set_code(exc.code)
        grpc_context.set_details(str(exc))

    def _count(self, records: Sequence[fleet_pb2.FeedbackRecord], new: list[fleet_pb2.FeedbackRecord]) -> None:
        stored = Counter((r.task, KINDS[r.kind]) for r in new)
        duplicates = Counter((r.task, KINDS[r.kind]) for r in records) - stored  # keeps counts > 0
        for outcome, counts in (("stored", stored), ("duplicate", duplicates)):
            for (task, kind), count in counts.items():
                self._metrics.feedback(task, kind, outcome, count)


def _own(records: Sequence[fleet_pb2.FeedbackRecord]) -> int:
    """The device's own records, which count against its quota: escalation records are the
    cloud's answers, as many as its experts gave."""
    return sum(r.kind != fleet_pb2.ESCALATION for r in records)


def _receipts_opened(records: Sequence[fleet_pb2.FeedbackRecord], device: str,
                     key: ReceiptKey | None) -> list[fleet_pb2.FeedbackRecord]:
    """`records`, each ESCALATION record replaced by the record its receipt carries: an
    ESCALATION record trains students as ground truth, so a device sends one only as the
    receipt the expert answered it with. PermissionDenied naming `records[i].receipt` unless
    the receipt verifies under `key` and its record is the escalation of the calling device,
    under the calling device's escalation ids (`esc/<device>/`)."""
    opened = []
    for i, r in enumerate(records):
        if r.kind != fleet_pb2.ESCALATION:
            opened.append(r)
            continue
        at = f"records[{i}].receipt"
        if key is None:
            raise PermissionDenied(at, "this fleet holds no receipt key: it takes no ESCALATION records")
        record = verify(r.receipt, key, at)
        if record.device_id != device:
            raise PermissionDenied(f"{at}.device_id", f"the escalation of {record.device_id[:128]!r}, not of the "
                                                      f"calling device {device!r}")
        if not record.record_id.startswith(f"esc/{device}/"):
            raise PermissionDenied(f"{at}.record_id", f"{record.record_id[:128]!r} is not an escalation id of the "
                                                      f"calling device (esc/{device}/...)")
        opened.append(record)
    return opened


def _authorise(records: Sequence[fleet_pb2.FeedbackRecord], device: str) -> None:
    """PermissionDenied if a record of the device's own (not an escalation, which
    `_receipts_opened` authorised) names another device; then makes each the caller's: its
    device id, and its id under `dev/<device>/`, where no other device's ids and no expert's
    (`esc/...`) can be."""
    own = [(i, r) for i, r in enumerate(records) if r.kind != fleet_pb2.ESCALATION]
    for i, r in own:
        if r.device_id and r.device_id != device:
            raise PermissionDenied(f"records[{i}].device_id", f"{r.device_id!r} is not the calling device {device!r}")
    for _, r in own:
        r.device_id = device
        r.record_id = f"dev/{device}/{r.record_id}"


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    """Up to `size` bytes at `offset`, opened, read and closed in the calling (worker) thread: a
    file object kept open across chunks would be closed on the event loop, which waits for a
    read that hangs (a stuck network mount) and so stalls every RPC of the replica."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def _parsed(request: M | Undecodable) -> M:
    """The request, or InvalidRequest naming its type if its body did not parse (`tandem.wire`)."""
    try:
        return parsed(request)
    except FieldError as exc:
        raise InvalidRequest.of(exc) from None


def _check_request(field: str, name: str) -> None:
    try:
        check_name(field, name)
    except FieldError as exc:
        raise InvalidRequest.of(exc) from None


@contextlib.contextmanager
def _registry_io() -> Iterator[None]:
    """A registry volume that fails to read (a shared NFS mount) or a published version whose
    manifest is damaged: UNAVAILABLE, so edges keep their model and poll again later."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise StoreUnavailable(f"model registry read failed: {type(exc).__name__}: {exc}") from exc
