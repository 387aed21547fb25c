"""The fault-injecting proxy (benchmarks/netfault.py), run as its own process in front of a real
echo server on loopback: forwarding, partitions and resets, delays, order, half-close, stopping."""

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks.netfault import NetFault, running_netfault
from tandem.subprocesses import announced_server


class _Echo(socketserver.BaseRequestHandler):
    """Echoes until the client's EOF, then closes (a half-close comes back as one)."""

    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # the proxy's resets
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with _EchoServer(("127.0.0.1", 0), _Echo) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1]
        server.shutdown()
        thread.join()


@pytest.fixture(scope="module")
def proxy(echo_port: int) -> Iterator[tuple[int, NetFault]]:
    with running_netfault(f"127.0.0.1:{echo_port}") as started:
        yield started


@pytest.fixture
def netfault(proxy: tuple[int, NetFault]) -> Iterator[NetFault]:
    """The module's proxy, healed, once it has closed the previous tests' connections."""
    netfault = proxy[1]
    netfault.heal()
    deadline = time.monotonic() + 2
    while netfault.stats().active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert netfault.stats().active == 0
    yield netfault
    netfault.heal()


@pytest.fixture
def port(proxy: tuple[int, NetFault]) -> int:
    return proxy[0]


def _connect(port: int, timeout_s: float = 2.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _round_trip_s(sock: socket.socket, message: bytes) -> float:
    start = time.monotonic()
    sock.sendall(message)
    assert _receive(sock, len(message)) == message
    return time.monotonic() - start


def test_passes_data_both_ways_and_counts_it(port: int, netfault: NetFault) -> None:
    before = netfault.stats()
    payload = bytes(range(256)) * 1024  # 256 KiB: several chunks, beyond one socket buffer
    with _connect(port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert _receive(sock, len(payload)) == payload
        sender.join()
    after = netfault.stats()
    assert after.mode == "pass"
    assert after.connections == before.connections + 1
    assert after.bytes_up - before.bytes_up == len(payload)
    assert after.bytes_down - before.bytes_down == len(payload)


def test_a_cut_holds_open_and_new_connections_until_healed(port: int, netfault: NetFault) -> None:
    with _connect(port) as open_sock:
        _round_trip_s(open_sock, b"before")
        netfault.cut()
        assert netfault.stats().mode == "cut"
        open_sock.sendall(b"held")
        with _connect(port) as new_sock:  # accepted, not forwarded
            new_sock.sendall(b"new")
            for sock in (open_sock, new_sock):
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recv(16)
                sock.settimeout(2)
            netfault.heal()
            assert _receive(open_sock, 4) == b"held"
            assert _receive(new_sock, 3) == b"new"


def test_a_cut_with_reset_resets_and_refuses_until_healed(port: int, netfault: NetFault) -> None:
    with _connect(port) as open_sock:
        _round_trip_s(open_sock, b"before")
        resets = netfault.stats().resets
        netfault.cut(reset=True)
        with pytest.raises(ConnectionResetError):
            open_sock.recv(16)
    with pytest.raises(ConnectionResetError):  # at connect() or at the first recv()
        with _connect(port) as new_sock:
            new_sock.recv(16)
    assert netfault.stats().resets == resets + 2
    netfault.heal()
    with _connect(port) as sock:
        _round_trip_s(sock, b"after")


def test_a_delay_holds_each_direction_at_least_its_time(port: int, netfault: NetFault) -> None:
    with _connect(port) as sock:
        assert _round_trip_s(sock, b"warm") < 0.2
        netfault.delay(100)
        assert netfault.stats().delay_ms == 100
        assert 0.2 <= _round_trip_s(sock, b"slow") < 1.0  # 100 ms each way
        netfault.heal()
        assert _round_trip_s(sock, b"fast") < 0.2  # lifted


def test_jitter_never_reorders(port: int, netfault: NetFault) -> None:
    netfault.delay(20, jitter_ms=20)
    messages = [f"<{i:03}>".encode() for i in range(60)]
    with _connect(port) as sock:
        for message in messages:  # separate chunks, each with its own draw
            sock.sendall(message)
            time.sleep(0.002)
        assert _receive(sock, sum(map(len, messages))) == b"".join(messages)


def test_half_close_is_forwarded(port: int, netfault: NetFault) -> None:
    with _connect(port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert _receive(sock, 64) == b"last words"  # then EOF: the echo closed after ours
        assert sock.recv(16) == b""


def test_bad_commands_are_refused(netfault: NetFault) -> None:
    with pytest.raises(RuntimeError, match="delay and jitter"):
        netfault.delay(-1)
    with pytest.raises(RuntimeError, match="unknown command"):
        netfault._call({"cmd": "flood"})
    assert netfault.stats().mode == "pass"


def test_the_process_stops_cleanly(echo_port: int, tmp_path: Path) -> None:
    control = tmp_path / "control.sock"
    args = ["-m", "benchmarks.netfault", "--target", f"127.0.0.1:{echo_port}", "--control", str(control)]
    with announced_server(args, timeout_s=30, stop_timeout_s=5) as server:
        nf = NetFault(control)
        open_sock = _connect(server.port)
        _round_trip_s(open_sock, b"hi")
        nf.cut()  # a held connection does not keep it from stopping
        open_sock.sendall(b"held")
    with open_sock:
        assert server.process.returncode == 0  # stopped by its SIGTERM, not killed
        with pytest.raises(ConnectionResetError):  # reset, never left hanging
            open_sock.recv(16)
    assert not control.exists()
    with pytest.raises(ConnectionRefusedError):
        _connect(server.port).close()

    before = set(psutil.Process().children())  # the module's proxy among them
    with running_netfault(f"127.0.0.1:{echo_port}") as (port, nf):
        started = set(psutil.Process().children()) - before
        assert len(started) == 1 and "benchmarks.netfault" in started.pop().cmdline()
        assert nf.control.exists()
    assert not nf.control.parent.exists()
    assert set(psutil.Process().children()) <= before
