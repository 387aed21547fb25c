"""Calls to the cloud over one channel. `Escalator` is the seam for escalation: the daemon
depends on the protocol, `CloudClient` is the real transport, and tests may plug in their own.

Escalate goes to the task's expert application; ReportFeedback, GetManifest and FetchModel
go to the registry application (Serve's proxy routes by the `application` metadata).
"""

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import grpc

from edge.config import CloudConfig
from edge.errors import CloudError
from tandem.v1 import cloud_pb2, cloud_pb2_grpc


class Escalator(Protocol):
    async def escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        """Answers or raises CloudError; never hangs past the configured deadline."""

    async def close(self) -> None: ...


def channel_options(cfg: CloudConfig) -> list[tuple[str, int | str]]:
    """Retries and keepalive live in the channel config, not in hand-written loops."""
    service_config = {
        "methodConfig": [
            {
                "name": [{"service": "tandem.v1.Cloud"}],
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
        # Pings on idle links are allowed by default gRPC servers only every 5 minutes
        # (more often gets GOAWAY too_many_pings): keepalive_ms defaults to that.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # While the cloud is down the channel reconnects in the background; cap its backoff
        # (default up to 120 s) so that a recovered cloud is used again within seconds.
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", cfg.max_reconnect_backoff_ms),
    ]


class CloudClient:
    """Every call raises CloudError on failure, never a raw gRPC error."""

    def __init__(self, cfg: CloudConfig) -> None:
        if cfg.target is None:
            raise ValueError("cloud.target is not set")
        self._timeout_s = cfg.deadline_ms / 1000
        self._applications = cfg.applications
        self._registry = (("application", cfg.registry_application),)
        self._channel = grpc.aio.insecure_channel(cfg.target, options=channel_options(cfg))
        self._stub = cloud_pb2_grpc.CloudStub(self._channel)

    async def escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        # A channel that failed to connect fails every call anyway, after retries and their
        # backoff (about 150 ms measured): answer locally at once instead.
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise CloudError(grpc.StatusCode.UNAVAILABLE, "not connected; reconnecting in the background")
        application = self._applications.get(request.task, request.task)
        metadata = (("application", application), ("x-request-id", request.request_id))
        with _cloud_errors():
            return await self._stub.Escalate(request, timeout=self._timeout_s, metadata=metadata)

    async def report_feedback(
        self, records: list[cloud_pb2.FeedbackRecord], timeout_s: float
    ) -> cloud_pb2.ReportFeedbackResponse:
        request = cloud_pb2.ReportFeedbackRequest(records=records)
        with _cloud_errors():
            return await self._stub.ReportFeedback(request, timeout=timeout_s, metadata=self._registry)

    async def get_manifest(self, task: str, timeout_s: float) -> cloud_pb2.ModelManifest:
        with _cloud_errors():
            return await self._stub.GetManifest(
                cloud_pb2.GetManifestRequest(task=task), timeout=timeout_s, metadata=self._registry
            )

    async def fetch_model(self, task: str, version: str, timeout_s: float) -> AsyncIterator[cloud_pb2.ModelChunk]:
        """The version's chunks in order; `timeout_s` bounds the whole download."""
        request = cloud_pb2.FetchModelRequest(task=task, version=version)
        call = self._stub.FetchModel(request, timeout=timeout_s, metadata=self._registry)
        try:
            with _cloud_errors():
                async for chunk in call:
                    yield chunk
        finally:
            call.cancel()  # a consumer that stops early must not leave the stream open

    async def close(self) -> None:
        await self._channel.close()


@contextlib.contextmanager
def _cloud_errors() -> Iterator[None]:
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        raise CloudError(exc.code(), exc.details() or "") from exc
