"""Servers started as subprocesses that announce their port, and free loopback ports for
them: what the tests and the benchmarks start the system's parts with."""

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

PORT_LINE = re.compile(r"listening on port (\d+)")


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[str]
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def announced_server(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120,
                     stop_timeout_s: float = 15) -> Iterator[Server]:
    """`start_server` for the block; `stop_server` on exit."""
    server = start_server(args, env, timeout_s)
    try:
        yield server
    finally:
        stop_server(server, stop_timeout_s)


def start_server(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120) -> Server:
    """Runs `python args...` until it prints 'listening on port N'; the child is stopped (and
    its output drained) if it does not."""
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        # Its own process group, so that a kill takes whatever it started with it; in the same
        # session (not start_new_session), which would put it in a scheduler autogroup of its
        # own and change how the CPUs are shared between the parts being measured.
        process_group=0,
    )
    try:
        return Server(process, _wait_for_port(process, timeout_s))
    except BaseException:
        kill_server(process)
        raise


def stop_server(server: Server, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL to its process group: at once to whatever the stopped process
    left in it, or to all of it if the process has not stopped within `timeout_s` (a killed
    cloud orphans Ray's and vLLM's processes, so give it time)."""
    server.process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=timeout_s)
    kill_server(server.process)


def kill_server(process: subprocess.Popen[str]) -> None:
    """SIGKILL to the process's whole group (what it started with it), then reaps it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _wait_for_port(process: subprocess.Popen[str], timeout_s: float) -> int:
    """Reads the child's stdout in a thread for its whole life (a full pipe would block the
    child) and returns the first announced port."""
    stdout = process.stdout
    if stdout is None:
        raise ValueError(f"{process.args}: started without stdout=PIPE, so its port cannot be read")
    ports: queue.Queue[int | None] = queue.Queue()

    def drain() -> None:
        for line in stdout:
            if match := PORT_LINE.search(line):
                ports.put(int(match.group(1)))
        ports.put(None)  # EOF: the child exited

    threading.Thread(target=drain, daemon=True).start()
    try:
        port = ports.get(timeout=timeout_s)
    except queue.Empty:
        port = None
    if port is None:
        try:
            code = process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{process.args} announced no port within {timeout_s:.0f} s") from None
        raise RuntimeError(f"{process.args} exited with code {code} before announcing its port; see its stderr above")
    return port
