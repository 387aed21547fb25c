"""A fault-injecting TCP proxy on loopback, for the chaos benchmark (issue #11).

The benchmark puts it between the edge and the cloud and turns faults on and off while the
load runs: a partition, resets, added latency with jitter. Kernel tools would do it (tc/netem,
iptables), but CI has no netem module, and needing root and one global network namespace for
a benchmark is a poor trade; a userspace proxy runs anywhere Python does, touches only the
connections it carries, and counts what it forwarded.

It runs as its own process, so that its forwarding does not share an event loop or the GIL
with what is measured:

    python -m benchmarks.netfault --target HOST:PORT --control PATH [--listen-port N]

prints `listening on port N` once both its sockets are ready (what
`tandem.subprocesses.announced_server` waits for) and stops on SIGTERM or SIGINT. Its stdout
belongs to that reader, so faults are set through a unix socket at PATH instead: one JSON
object per line in, one line out ("ok", the stats as JSON, or "error ..."):

    {"cmd": "pass"}                            forward both ways (lifts every fault)
    {"cmd": "cut"}                             partition: nothing is forwarded either way
    {"cmd": "cut", "reset": true}              reset every connection; new ones reset at once
    {"cmd": "delay", "ms": 50, "jitter_ms": 10}
    {"cmd": "stats"}

Each command replaces the current fault (a cut drops a delay; `pass` lifts both). A cut is a
blackhole, not a close: the proxy stops reading (what it had read, up to a few hundred KiB a
direction, waits in its buffers, the rest in the kernel's), so TCP backpressure reaches the
sender as it would across a real partition; new connections are accepted but not connected
onwards; `pass` lets everything held flow again, in order. A delay holds each chunk MS +- uniform JITTER_MS after it arrived, per direction,
never reordering (a later chunk with a shorter draw waits for the earlier one). Half-closes
are forwarded as half-closes. With `reset` the proxy accepts new connections and resets them
at once rather than closing its listening socket, whose port could be taken meanwhile.
Stopping resets the connections still open.

From the benchmark, `running_netfault(target)` starts it and yields its port and a `NetFault`
controller with blocking calls: `cut()`, `heal()`, `delay(ms, jitter_ms)`, `stats()`.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.subprocesses import announced_server

CHUNK = 64 * 1024
# Chunks a direction holds while they wait out a delay: beyond them the proxy stops reading and
# TCP backpressure applies, so a delayed fast sender does not grow the proxy's memory.
QUEUE_CHUNKS = 64

ChunkQueue = asyncio.Queue[tuple[float, bytes]]  # (when to forward, chunk); b"" is the EOF


@dataclass(frozen=True)
class Stats:
    """What `stats` answers. Bytes are those forwarded (written onwards), not those held."""

    mode: str  # pass, cut, reset or delay
    delay_ms: float
    jitter_ms: float
    connections: int  # accepted since start
    active: int
    resets: int  # connections reset by `cut --reset`, open or refused
    bytes_up: int  # client -> target
    bytes_down: int  # target -> client


@dataclass
class Counters:
    connections: int = 0
    active: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    def forwarded(self, up: bool, size: int) -> None:
        if up:
            self.bytes_up += size
        else:
            self.bytes_down += size


class Faults:
    """The current fault, shared by every connection."""

    def __init__(self) -> None:
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.refusing = False
        self.delay_s = 0.0
        self.jitter_s = 0.0
        self._random = random.Random()

    def set(self, flowing: bool = True, refusing: bool = False, delay_ms: float = 0, jitter_ms: float = 0) -> None:
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0, not {delay_ms} and {jitter_ms}")
        self.refusing = refusing
        self.delay_s, self.jitter_s = delay_ms / 1000, jitter_ms / 1000
        if flowing:
            self.flowing.set()
        else:
            self.flowing.clear()

    @property
    def mode(self) -> str:
        if self.refusing:
            return "reset"
        if not self.flowing.is_set():
            return "cut"
        return "delay" if self.delay_s or self.jitter_s else "pass"

    def due(self) -> float:
        """When a chunk that arrives now is to be forwarded (event-loop time)."""
        held = self.delay_s + self._random.uniform(-self.jitter_s, self.jitter_s)
        return asyncio.get_running_loop().time() + max(0.0, held)


class Proxy:
    """Forwards each accepted connection to `target` under the current `Faults`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.faults = Faults()
        self.counters = Counters()
        self._connections: set[asyncio.Task[None]] = set()
        self._controls: set[asyncio.Task[None]] = set()

    def stats(self) -> Stats:
        faults = self.faults
        return Stats(faults.mode, faults.delay_s * 1000, faults.jitter_s * 1000, **asdict(self.counters))

    async def serve_client(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """One proxied connection: held while cut, reset when refusing or on any error."""
        writers = [client_w]
        clean = False
        self.counters.connections += 1
        self.counters.active += 1
        with _handling(self._connections):
            try:
                if self.faults.refusing:
                    self.counters.resets += 1
                    return
                await self.faults.flowing.wait()  # a partition: the target sees no connection yet
                target_r, target_w = await asyncio.open_connection(*self.target, limit=CHUNK)
                writers.append(target_w)
                clean = await self._forward(client_r, target_w, target_r, client_w)
            except OSError:
                pass  # the target refused: the client sees a reset, as it would from the target
            finally:
                self.counters.active -= 1
                await _close(writers, reset=not clean)

    async def _forward(self, client_r: asyncio.StreamReader, target_w: asyncio.StreamWriter,
                       target_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> bool:
        """Both directions, each a receiving and a sending task around a queue; False if a side
        failed (its peer reset, say), when the other tasks are cancelled."""
        failed = False
        try:
            async with asyncio.TaskGroup() as group:
                for reader, writer, up in ((client_r, target_w, True), (target_r, client_w, False)):
                    queue: ChunkQueue = asyncio.Queue(QUEUE_CHUNKS)
                    group.create_task(self._receive(reader, queue))
                    group.create_task(self._send(queue, writer, up))
        except* OSError:
            failed = True
        return not failed

    async def _receive(self, reader: asyncio.StreamReader, queue: ChunkQueue) -> None:
        while True:
            await self.faults.flowing.wait()  # cut: leave the bytes unread
            chunk = await reader.read(CHUNK)
            await queue.put((self.faults.due(), chunk))
            if not chunk:
                return

    async def _send(self, queue: ChunkQueue, writer: asyncio.StreamWriter, up: bool) -> None:
        while True:
            due, chunk = await queue.get()
            await self._hold(due)
            if not chunk:
                if writer.can_write_eof():
                    writer.write_eof()  # a half-close stays a half-close
                return
            writer.write(chunk)
            await writer.drain()
            self.counters.forwarded(up, len(chunk))

    async def _hold(self, due: float) -> None:
        """Until `due`, and for as long as a cut lasts (one that starts during the delay too)."""
        await self.faults.flowing.wait()
        wait_s = due - asyncio.get_running_loop().time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
            await self.faults.flowing.wait()

    async def serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with _handling(self._controls):
            try:
                while line := await reader.readline():
                    writer.write(f"{await self._command(line)}\n".encode())
                    await writer.drain()
            except (OSError, ValueError):
                pass  # the controller went away, or sent a line beyond the reader's limit
            finally:
                await _close([writer], reset=False)

    async def _command(self, line: bytes) -> str:
        try:
            request = json.loads(line)
            match request.get("cmd"):
                case "pass":
                    self.faults.set()
                case "cut" if request.get("reset"):
                    self.faults.set(flowing=False, refusing=True)
                    await self.reset_all()
                case "cut":
                    self.faults.set(flowing=False)
                case "delay":
                    self.faults.set(delay_ms=float(request["ms"]), jitter_ms=float(request.get("jitter_ms", 0)))
                case "stats":
                    return json.dumps(asdict(self.stats()))
                case other:
                    raise ValueError(f"unknown command {other!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"error {type(e).__name__}: {e}"
        return "ok"

    async def reset_all(self) -> None:
        """Resets every open connection, and returns once they are closed."""
        self.counters.resets += len(self._connections)
        await _cancel(self._connections)

    async def close(self) -> None:
        await _cancel(self._connections | self._controls)


@contextlib.contextmanager
def _handling(tasks: set[asyncio.Task[None]]) -> Iterator[None]:
    """Keeps the current connection handler's task in `tasks`, for `_cancel`. Cancelled (reset
    or stopping), it ends normally: nothing else awaits it, and Python 3.11's start_server logs
    a handler task that ends cancelled as an error."""
    task = asyncio.current_task()
    assert task is not None
    tasks.add(task)
    try:
        yield
    except asyncio.CancelledError:
        pass
    finally:
        tasks.discard(task)


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _close(writers: list[asyncio.StreamWriter], reset: bool) -> None:
    for writer in writers:
        if reset:
            _reset(writer)
        else:
            writer.close()
    for writer in writers:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with an RST rather than a FIN: linger on, timeout 0."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def serve(target: tuple[str, int], control: Path, listen_port: int = 0) -> None:
    """Runs the proxy until SIGTERM or SIGINT, then closes every socket and task it made."""
    proxy = Proxy(target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    controls = await asyncio.start_unix_server(proxy.serve_control, path=control)
    try:
        listener = await asyncio.start_server(proxy.serve_client, "127.0.0.1", listen_port, limit=CHUNK)
        port = listener.sockets[0].getsockname()[1]
        print(f"netfault to {target[0]}:{target[1]} listening on port {port}", flush=True)
        await stop.wait()
        listener.close()
        await listener.wait_closed()
    finally:
        controls.close()
        await controls.wait_closed()
        await proxy.close()
        control.unlink(missing_ok=True)


class NetFault:
    """Sets a running proxy's faults through its control socket. Blocking calls, for the
    benchmark's own (synchronous) code; each is in effect once it returns."""

    def __init__(self, control: str | os.PathLike[str], timeout_s: float = 10) -> None:
        self.control = Path(control)
        self.timeout_s = timeout_s

    def heal(self) -> None:
        """Forwards everything again, held bytes first; lifts a delay too."""
        self._call({"cmd": "pass"})

    def cut(self, reset: bool = False) -> None:
        """A partition; with `reset`, resets every connection and refuses new ones instead."""
        self._call({"cmd": "cut", "reset": reset})

    def delay(self, ms: float, jitter_ms: float = 0) -> None:
        self._call({"cmd": "delay", "ms": ms, "jitter_ms": jitter_ms})

    def stats(self) -> Stats:
        return Stats(**json.loads(self._call({"cmd": "stats"})))

    def _call(self, request: dict[str, Any]) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.control))
            sock.sendall(json.dumps(request).encode() + b"\n")
            with sock.makefile("rb") as replies:
                reply = replies.readline().decode().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"netfault {request}: {reply or 'no reply'}")
        return reply


@contextlib.contextmanager
def running_netfault(target: str, listen_port: int = 0) -> Iterator[tuple[int, NetFault]]:
    """Starts the proxy to `target` ("HOST:PORT") in its own process; yields its port and its
    controller, and stops it on exit."""
    with tempfile.TemporaryDirectory(prefix="netfault-") as folder:
        control = Path(folder) / "control.sock"
        args = ["-m", "benchmarks.netfault", "--target", target, "--control", str(control),
                "--listen-port", str(listen_port)]
        with announced_server(args, timeout_s=30, stop_timeout_s=5) as server:
            yield server.port, NetFault(control)


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netfault", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=parse_target, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--control", type=Path, required=True, help="unix socket path for the fault commands")
    parser.add_argument("--listen-port", type=int, default=0, help="loopback port to listen on (0: a free one)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.target, args.control, args.listen_port))


if __name__ == "__main__":
    main()
