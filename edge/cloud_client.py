"""Calls to the cloud over one channel: one mutual-TLS connection to the cloud's proxy, kept
open while there are calls (nginx closes one idle for its keepalive_timeout whatever the
pings; the channel reconnects at the next call).

Serve's gRPC proxy routes each call by its `application` metadata: escalations go to the
application of the task's expert, feedback and models to the fleet application. The task →
application map is the cloud's own (Fleet.GetRoutes), fetched at the first escalation, again
when a task has no route, and in the background once it is `routes_refresh_s` old: a rollout
(`tandem cloud rollout-expert`) switches a task to a new version of its expert and deletes the
old one after a drain. An escalation whose application is gone (NOT_FOUND from Serve's proxy)
asks the routes again and, if they name another application, is sent there once more within
its deadline: the switch fails no request.
`Escalator` is what the service depends on; `CloudClient` is the transport.
"""

import asyncio
import contextlib
import datetime
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from edge.config import CloudLinkConfig, TLSFiles
from edge.errors import CloudCallError, NoRoute
from tandem.contract import CALLER_TIMEOUT_METADATA, FLEET_APPLICATION, MESSAGE_MAX_BYTES
from tandem.settings import ConfigError
from tandem.v1 import expert_pb2, expert_pb2_grpc, fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = (
    expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].full_name,
)
FLEET_METADATA = (("application", FLEET_APPLICATION),)
# A device certificate this close to expiry is logged as an error at start.
CERT_WARN_BEFORE = datetime.timedelta(days=14)


class Escalator(Protocol):
    async def escalate(self, request: expert_pb2.EscalateRequest) -> expert_pb2.EscalateResponse:
        """Answers or raises CloudCallError; never hangs past the configured deadline."""


def channel_options(cfg: CloudLinkConfig) -> list[tuple[str, int | str]]:
    """Retries and keepalive live in the channel config, not in hand-written loops."""
    service_config = {
        "methodConfig": [
            {
                "name": [{"service": service} for service in SERVICES],
                "retryPolicy": {
                    "maxAttempts": cfg.max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    # Only UNAVAILABLE: unreachable, or no healthy engine behind the proxy; the
                    # request changed nothing, and another attempt may reach a healthy replica.
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.keepalive_time_ms", cfg.keepalive_ms),
        ("grpc.keepalive_timeout_ms", 5000),
        # Pings find a dead link (a NAT that dropped it) between calls. Pings on idle links are
        # allowed by default gRPC servers only every 5 minutes (more often gets GOAWAY
        # too_many_pings): keepalive_ms defaults to that. nginx answers any ping, but pings do not
        # reset its keepalive_timeout (measured, nginx 1.22): the proxy's own timeouts decide how
        # long an idle connection lives.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # While the cloud is down the channel reconnects in the background; cap its backoff
        # (default up to 120 s) so that a recovered cloud is used again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", cfg.max_reconnect_backoff_ms),
        # The proxy's and Serve's limit too: a message one side sends the other accepts.
        ("grpc.max_receive_message_length", MESSAGE_MAX_BYTES),
        ("grpc.max_send_message_length", MESSAGE_MAX_BYTES),
    ]


def open_channel(cfg: CloudLinkConfig, device_id: str | None = None) -> grpc.aio.Channel:
    """The one channel to the cloud: mutual TLS with the device's certificate, or plaintext
    when the config says `insecure` (logged: the cloud then trusts the device id a message claims).
    With `device_id`, the certificate must be that device's."""
    if cfg.target is None:
        raise ValueError("cloud.target is not set")
    if cfg.tls is not None:
        return grpc.aio.secure_channel(cfg.target, _credentials(cfg.tls, device_id), options=channel_options(cfg))
    if not cfg.insecure:  # the config refuses this; a config built without validation must not fall through
        raise ConfigError("cloud.tls is required unless cloud.insecure is true")
    log.warning("cloud.insecure: talking to %s in plaintext, without a device certificate; development only",
                cfg.target)
    return grpc.aio.insecure_channel(cfg.target, options=channel_options(cfg))


def _credentials(tls: TLSFiles, device_id: str | None) -> grpc.ChannelCredentials:
    files = {}
    for name in ("ca", "cert", "key"):
        path = getattr(tls, name)
        try:
            files[name] = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cloud.tls.{name}: cannot read {path}: {exc}") from exc
    _check_certificate(tls.cert, files["cert"], device_id)
    return grpc.ssl_channel_credentials(
        root_certificates=files["ca"], private_key=files["key"], certificate_chain=files["cert"]
    )


class CloudClient:
    """Every call raises CloudCallError on failure, never a raw gRPC error."""

    def __init__(self, cfg: CloudLinkConfig, device_id: str | None = None) -> None:
        """`device_id`: the daemon's, which its certificate must name (None: not checked)."""
        self._channel = open_channel(cfg, device_id)
        self._timeout_s = cfg.deadline_ms / 1000
        self._routes_refresh_s = cfg.routes_refresh_s
        self._expert = expert_pb2_grpc.ExpertStub(self._channel)
        self._fleet = fleet_pb2_grpc.FleetStub(self._channel)
        self._routes: dict[str, str] = {}
        self._routes_asked_at = -math.inf
        self._routes_failure: tuple[grpc.StatusCode, str] | None = None
        self._routes_lock = asyncio.Lock()
        self._refreshing: asyncio.Task[None] | None = None  # the background refresh under way

    async def escalate(self, request: expert_pb2.EscalateRequest) -> expert_pb2.EscalateResponse:
        deadline = time.monotonic() + self._timeout_s
        # A channel that failed to connect fails every call anyway, after retries and their
        # backoff: answer locally at once instead.
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise CloudCallError(grpc.StatusCode.UNAVAILABLE, "not connected; reconnecting in the background")
        application = await self._application(request.task, deadline)
        self._refresh_stale_routes()
        try:
            return await self._send(request, application, deadline)
        except CloudCallError as exc:
            moved = await self._moved(request.task, application, exc.code, deadline)
            if moved is None:
                if exc.code == grpc.StatusCode.NOT_FOUND and self._routes.get(request.task) == application:
                    # The cloud still names an application its proxy does not know: no route
                    # until the next ask (within routes_refresh_s), rather than a call to a
                    # missing application and a GetRoutes at every escalation.
                    self._routes.pop(request.task, None)
                raise
            log.info("task %s: application %s is gone (%s); sent again to %s", request.task, application,
                     exc.code.name, moved)
            return await self._send(request, moved, deadline)

    async def _send(self, request: expert_pb2.EscalateRequest, application: str,
                    deadline: float) -> expert_pb2.EscalateResponse:
        timeout_s = _remaining_s(deadline)
        metadata = (
            ("application", application),
            ("x-request-id", request.request_id),
            # Serve's proxy drops the gRPC deadline: the expert stops work the edge gave up on.
            (CALLER_TIMEOUT_METADATA, str(int(timeout_s * 1000))),
        )
        with _cloud_errors():
            return await self._expert.Escalate(request, timeout=timeout_s, metadata=metadata)

    async def _moved(self, task: str, application: str, code: grpc.StatusCode, deadline: float) -> str | None:
        """The task's application, if the cloud now names another than `application`, which
        failed with `code`; None if it does not, or the deadline leaves no time. NOT_FOUND (Serve's
        proxy knows no such application: the cloud's topology changed) asks the cloud at once;
        UNAVAILABLE (an application being deleted, or a cloud in trouble), only once the routes
        are `routes_refresh_s` old, so that an outage does not double the calls."""
        if code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) or deadline <= time.monotonic():
            return None
        async with self._routes_lock:
            if self._routes.get(task) == application and (code == grpc.StatusCode.NOT_FOUND or self._routes_stale()):
                await self._ask_routes(deadline)  # unless a concurrent caller has just done so
        moved = self._routes.get(task)
        return moved if moved != application and deadline > time.monotonic() else None

    def _refresh_stale_routes(self) -> None:
        """Asks the routes again in the background once they are `routes_refresh_s` old; the
        escalations meanwhile keep the routes they have."""
        if self._refreshing is None and self._routes_stale():
            self._refreshing = asyncio.create_task(self._refresh_routes())

    async def _refresh_routes(self) -> None:
        try:
            async with self._routes_lock:
                if self._routes_stale():
                    await self._ask_routes(time.monotonic() + self._timeout_s)
        finally:
            self._refreshing = None

    def _routes_stale(self) -> bool:
        return time.monotonic() - self._routes_asked_at >= self._routes_refresh_s

    async def report_feedback(
        self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float
    ) -> fleet_pb2.ReportFeedbackResponse:
        request = fleet_pb2.ReportFeedbackRequest(records=records)
        with _cloud_errors():
            return await self._fleet.ReportFeedback(request, timeout=timeout_s, metadata=FLEET_METADATA)

    async def get_manifest(self, task: str, timeout_s: float) -> fleet_pb2.ModelManifest:
        with _cloud_errors():
            return await self._fleet.GetManifest(
                fleet_pb2.GetManifestRequest(task=task), timeout=timeout_s, metadata=FLEET_METADATA
            )

    async def ack_rollout(self, task: str, version: str, timeout_s: float) -> None:
        """Tells the cloud that `version` of `task` now serves here."""
        with _cloud_errors():
            await self._fleet.AckRollout(
                fleet_pb2.AckRolloutRequest(task=task, version=version), timeout=timeout_s, metadata=FLEET_METADATA
            )

    async def fetch_model(self, task: str, version: str, timeout_s: float) -> AsyncIterator[fleet_pb2.ModelChunk]:
        """The version's chunks in order; `timeout_s` bounds the whole download."""
        request = fleet_pb2.FetchModelRequest(task=task, version=version)
        call = self._fleet.FetchModel(request, timeout=timeout_s, metadata=FLEET_METADATA)
        try:
            with _cloud_errors():
                async for chunk in call:
                    yield chunk
        finally:
            call.cancel()  # a consumer that stops early must not leave the stream open

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        await self._channel.close()

    async def _application(self, task: str, deadline: float) -> str:
        """The Serve application of the task's expert. Asks the cloud when the task has no
        route, at most every `routes_refresh_s` (one caller asks, concurrent ones wait for it)."""
        if task not in self._routes:
            async with self._routes_lock:
                if task not in self._routes and self._routes_stale():
                    await self._ask_routes(deadline)
        application = self._routes.get(task)
        if application is not None:
            return application
        if self._routes_failure is not None:
            code, details = self._routes_failure
            raise CloudCallError(code, f"GetRoutes: {details}")
        raise NoRoute(task)

    async def _ask_routes(self, deadline: float) -> None:
        timeout_s = _remaining_s(deadline)
        self._routes_asked_at = time.monotonic()
        try:
            answer = await self._fleet.GetRoutes(fleet_pb2.GetRoutesRequest(), timeout=timeout_s, metadata=FLEET_METADATA)
        except grpc.aio.AioRpcError as exc:
            self._routes_failure = exc.code(), exc.details() or ""
            log.warning("cannot get the expert routes from the cloud: %s %s", exc.code().name, exc.details())
            return
        self._routes_failure = None
        if dict(answer.applications) != self._routes:
            log.info("expert applications by task, from the cloud: %s", dict(answer.applications))
        self._routes = dict(answer.applications)


def _check_certificate(path: Path, pem: bytes, device_id: str | None) -> None:
    """The cloud takes the certificate's CN as the device id and refuses feedback records that
    name another: a mismatch would send every record to the dead table, so it stops the start.
    An expired certificate only fails calls (answered locally), so it is logged, not fatal."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"cloud.tls.cert: {path} is not a PEM certificate: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    if device_id is not None and common_name != device_id:
        raise ConfigError(f"cloud.tls.cert: {path} is the certificate of {common_name!r}, not of device_id "
                          f"{device_id!r}; enrol this device (tandem ca enroll {device_id}) or fix device_id")
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    if left <= CERT_WARN_BEFORE:
        log.error("the device certificate %s %s on %s: renew it (tandem ca enroll %s) and restart", path,
                  "expired" if left.total_seconds() <= 0 else "expires", cert.not_valid_after_utc.date(), common_name)


def _remaining_s(deadline: float) -> float:
    """Time left before `deadline`; a passed deadline fails the call without sending it."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise CloudCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "the escalation deadline passed before the call")
    return remaining


@contextlib.contextmanager
def _cloud_errors() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise CloudCallError(exc.code(), exc.details() or "") from exc
