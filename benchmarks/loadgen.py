"""Open- and closed-loop load against an async call.

Open loop: each request has a scheduled send time and its latency is measured from
that time, not from when it was actually sent, so a system that falls behind shows
its queueing instead of hiding it (no coordinated omission).

A call returns the name of the path that answered it (e.g. "local", "escalated") or
None; latencies are recorded overall and per path. Errors are counted by gRPC status
(or exception type) with one example message each: reported, never dropped.
"""

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from benchmarks.latency import LatencyRecorder

Call = Callable[[int], Awaitable[str | None]]

# Requests still running this long after the last scheduled send are cancelled and
# counted as UNFINISHED, so a run always ends, even against a server that hangs.
DRAIN_TIMEOUT_S = 30.0


@dataclass
class RunResult:
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    paths: dict[str, LatencyRecorder] = field(default_factory=dict)
    # How late each request left against its schedule: the generator's own error.
    lateness: LatencyRecorder = field(default_factory=LatencyRecorder)
    errors: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)
    offered: int = 0
    elapsed_s: float = 0.0
    # The send schedule's length; answers are counted for throughput only within it, or an
    # overloaded run's drain (up to a deadline past the last send) would dilute the rate.
    window_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    answered_in_window: int = 0

    @property
    def throughput_rps(self) -> float:
        """Successful answers per second within the send window."""
        return self.answered_in_window / self.window_s if self.window_s else 0.0

    def record(self, path: str | None, seconds: float) -> None:
        if time.perf_counter() - self.started <= self.window_s:
            self.answered_in_window += 1
        self.latency.record(seconds)
        if path is not None:
            self.paths.setdefault(path, LatencyRecorder()).record(seconds)

    def record_error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        self.error_examples.setdefault(kind, message[:300])

    def summary(self) -> dict[str, Any]:
        return {
            **self.latency.summary(),
            "paths": {name: rec.summary() for name, rec in sorted(self.paths.items())},
            "offered": self.offered,
            "elapsed_s": self.elapsed_s,
            "window_s": self.window_s,
            "throughput_rps": self.throughput_rps,
            "send_lateness_p50_ms": self.lateness.percentile_ms(50),
            "send_lateness_p99_ms": self.lateness.percentile_ms(99),
            "errors": dict(self.errors),
            "error_examples": self.error_examples,
        }


def fixed_rate(rate: float, duration_s: float) -> list[float]:
    """Send offsets, in seconds from the start, for `rate` requests per second."""
    return [i / rate for i in range(int(rate * duration_s))]


def poisson(rate: float, *, duration_s: float | None = None, count: int | None = None, seed: int = 0) -> list[float]:
    """Send offsets of a Poisson process at `rate` per second (exponential gaps), for
    `duration_s` seconds or `count` requests: exactly one of the two."""
    if (duration_s is None) == (count is None):
        raise ValueError("poisson: give exactly one of duration_s and count")
    if rate <= 0:
        raise ValueError(f"poisson: rate must be positive, not {rate}")
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while (count is None or len(offsets) < count) and (duration_s is None or t < duration_s):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def _timed(call: Call, i: int, scheduled: float, result: RunResult) -> None:
    result.lateness.record(time.perf_counter() - scheduled)
    try:
        path = await call(i)
    except grpc.aio.AioRpcError as exc:
        result.record_error(exc.code().name, exc.details() or "")
        return
    except Exception as exc:  # the run's measurement: counted and shown, not raised
        # An error that carries a gRPC status (the edge's CloudCallError) is counted by it.
        code = getattr(exc, "code", None)
        result.record_error(code.name if isinstance(code, grpc.StatusCode) else type(exc).__name__, str(exc))
        return
    result.record(path, time.perf_counter() - scheduled)


async def open_loop(call: Call, offsets: Sequence[float], drain_timeout_s: float = DRAIN_TIMEOUT_S) -> RunResult:
    """Fires `call(i)` at each offset, whether or not earlier calls have returned; ends
    at most `drain_timeout_s` after the last send."""
    result = RunResult(offered=len(offsets), window_s=max(offsets, default=0.0))
    start = result.started
    tasks = []
    for i, offset in enumerate(offsets):
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed(call, i, scheduled, result)))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            result.record_error("UNFINISHED", f"{len(pending)} requests still running {drain_timeout_s:.0f} s after the last send")
            result.errors["UNFINISHED"] += len(pending) - 1
    result.elapsed_s = time.perf_counter() - start
    return result


async def sequential(call: Call, count: int) -> RunResult:
    """`count` calls one after another: latency without any queueing."""
    result = RunResult(offered=count, window_s=float("inf"))
    for i in range(count):
        await _timed(call, i, time.perf_counter(), result)
    result.elapsed_s = result.window_s = time.perf_counter() - result.started
    return result


async def closed_loop(call: Call, concurrency: int, duration_s: float) -> RunResult:
    """`concurrency` callers, each sending its next request when the last returns."""
    result = RunResult(window_s=float("inf"))
    deadline = result.started + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            result.offered += 1
            await _timed(call, next(counter), time.perf_counter(), result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = result.window_s = time.perf_counter() - result.started
    return result
