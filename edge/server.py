"""The local API's gRPC server: its message limits, where it listens, and the health check
that probes it (`tandem edge health`).

`listen` is host:port (loopback by default) or a Unix socket. On a shared node (the
DaemonSet) the socket is the access control: only processes that can open its file (its mode
and directory, mounted into the pods allowed to call) reach Infer and Correct, and no port on
the node's network answers, so no other pod can inject CORRECTION feedback under this
device's identity.
"""

import os
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge.config import EdgeConfig
from tandem.contract import MESSAGE_MAX_BYTES


class ListenError(OSError):
    """The configured address cannot be served."""


def edge_server(cfg: EdgeConfig) -> grpc.aio.Server:
    """An unbound server with the daemon's limits; `bind` it once its services are added."""
    options = [
        ("grpc.max_receive_message_length", MESSAGE_MAX_BYTES),
        ("grpc.max_send_message_length", MESSAGE_MAX_BYTES),
    ]
    return grpc.aio.server(maximum_concurrent_rpcs=cfg.max_concurrent_rpcs, options=options)


def bind(server: grpc.aio.Server, cfg: EdgeConfig) -> int:
    """Binds `cfg.listen`; the TCP port (0 for a Unix socket)."""
    path = cfg.socket_path
    if path is None:
        return server.add_insecure_port(cfg.listen)
    _refuse_live_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    server.add_insecure_port(cfg.listen)
    # Before start(): the socket is bound but not listening, so no caller connects meanwhile
    # with the umask's looser mode.
    os.chmod(path, int(cfg.socket_mode, 8))
    return 0


def _refuse_live_socket(path: Path) -> None:
    """gRPC replaces an existing socket file when it binds: a second daemon would silently take
    the first one's callers. A stale file (nothing accepts on it) is fine to replace."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return
        except OSError as exc:
            raise ListenError(f"listen: cannot check the existing socket {path}: {exc}") from exc
    raise ListenError(f"listen: another process already serves unix://{path}")


async def check_health(target: str, service: str, timeout_s: float) -> str:
    """The grpc.health status of `service` at `target` (host:port or unix:///path), by name;
    UNREACHABLE when no answer came."""
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
