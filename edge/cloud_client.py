"""Escalation to the cloud. `Escalator` is the seam: the daemon depends on the
protocol, `GrpcEscalator` is the real transport, and tests may plug in their own."""

import json
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


class GrpcEscalator:
    def __init__(self, cfg: CloudConfig) -> None:
        if cfg.target is None:
            raise ValueError("cloud.target is not set")
        self._timeout_s = cfg.deadline_ms / 1000
        self._applications = cfg.applications
        self._channel = grpc.aio.insecure_channel(cfg.target, options=channel_options(cfg))
        self._stub = cloud_pb2_grpc.CloudStub(self._channel)

    async def escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        # A channel that failed to connect fails every call anyway, after retries and their
        # backoff (about 150 ms measured): answer locally at once instead.
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise CloudError(grpc.StatusCode.UNAVAILABLE, "not connected; reconnecting in the background")
        application = self._applications.get(request.task, request.task)
        metadata = (("application", application), ("x-request-id", request.request_id))
        try:
            return await self._stub.Escalate(request, timeout=self._timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise CloudError(exc.code(), exc.details() or "") from exc

    async def close(self) -> None:
        await self._channel.close()
