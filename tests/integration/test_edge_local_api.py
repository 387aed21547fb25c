"""The local API on a Unix socket (the DaemonSet's choice): served with the configured file
mode, never taken over from a running daemon, and probed by `tandem edge health`."""

import asyncio
import contextlib
import socket as sockets
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from edge.config import EdgeConfig, PolicyConfig
from edge.daemon import EdgeDaemon
from edge.server import ListenError, check_health
from tandem.v1 import edge_pb2, edge_pb2_grpc

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def socket_daemon(student_dir: Path, socket: Path) -> AsyncIterator[EdgeDaemon]:
    cfg = EdgeConfig(listen=f"unix://{socket}", metrics_port=None, tasks={"banking77": student_dir},
                     policy=PolicyConfig(mode="edge_only"), feedback={"outbox": None})
    daemon = EdgeDaemon(cfg)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop(grace_s=1)


def _health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem_cli", "edge", "health", *args],
                          capture_output=True, text=True, timeout=60)


async def test_the_local_api_answers_on_a_unix_socket_with_its_mode(student_dir: Path, tmp_path: Path) -> None:
    socket = tmp_path / "run" / "edge.sock"
    async with socket_daemon(student_dir, socket) as daemon:
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            r = await edge_pb2_grpc.EdgeStub(channel).Infer(
                edge_pb2.InferRequest(task="banking77", text=b"where is my card"), timeout=5)
        mode = stat.S_IMODE(socket.stat().st_mode)
        assert daemon.address == f"unix://{socket}"
        assert await check_health(f"unix://{socket}", "tandem.v1.Edge", 5) == "SERVING"
    assert r.label and mode == 0o660
    assert not socket.exists(), "the socket is removed when the daemon stops"
    assert await check_health(f"unix://{socket}", "", 1) == "UNREACHABLE"


async def test_a_second_daemon_does_not_take_over_a_served_socket(student_dir: Path, tmp_path: Path) -> None:
    socket = tmp_path / "edge.sock"
    async with socket_daemon(student_dir, socket):
        with pytest.raises(ListenError, match="another process already serves"):
            async with socket_daemon(student_dir, socket):
                pass
        assert await check_health(f"unix://{socket}", "", 5) == "SERVING"


async def test_a_stale_socket_file_is_replaced(student_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "edge.sock"
    with sockets.socket(sockets.AF_UNIX) as stale:  # bound, then closed: as after a crash
        stale.bind(str(path))
    async with socket_daemon(student_dir, path):
        assert await check_health(f"unix://{path}", "", 5) == "SERVING"


async def test_the_health_command_is_the_probe(student_dir: Path, tmp_path: Path) -> None:
    socket = tmp_path / "edge.sock"
    target = f"unix://{socket}"
    async with socket_daemon(student_dir, socket):
        # From a thread: the daemon shares this event loop and must keep answering.
        ready = await asyncio.to_thread(_health, "--target", target, "--service", "tandem.v1.Edge")
        unknown = await asyncio.to_thread(_health, "--target", target, "--service", "tandem.nothing")
    down = _health("--target", target, "--timeout", "1")
    assert ready.returncode == 0 and "tandem.v1.Edge" in ready.stdout and "SERVING" in ready.stdout
    assert unknown.returncode == 1 and "SERVICE_UNKNOWN" in unknown.stdout
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout
