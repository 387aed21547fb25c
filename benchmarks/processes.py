"""Starting servers as subprocesses that announce their port, and stopping them cleanly."""

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

PORT_LINE = re.compile(r"listening on port (\d+)")


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[str]
    port: int


@contextlib.contextmanager
def announced_server(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120) -> Iterator[Server]:
    """Runs `python args...` until it prints 'listening on port N'; SIGTERM on exit."""
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        port = _wait_for_port(process, timeout_s)
        yield Server(process, port)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_port(process: subprocess.Popen[str], timeout_s: float) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready and (match := PORT_LINE.search(process.stdout.readline())):
            return int(match.group(1))
    raise RuntimeError(f"{process.args} announced no port within {timeout_s:.0f} s (exit code {process.poll()})")
