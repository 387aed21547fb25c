"""Open- and closed-loop load against an async call.

Open loop: each request has a scheduled send time and its latency is measured from
that time, not from when it was actually sent, so a system that falls behind shows
its queueing instead of hiding it (no coordinated omission).
"""

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from benchmarks.latency import LatencyRecorder

Call = Callable[[int], Awaitable[object]]


@dataclass
class RunResult:
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    # How late each request left against its schedule: the generator's own error.
    lateness: LatencyRecorder = field(default_factory=LatencyRecorder)
    errors: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def throughput_rps(self) -> float:
        return self.latency.count / self.elapsed_s if self.elapsed_s else 0.0


def fixed_rate(rate: float, duration_s: float) -> list[float]:
    """Send offsets, in seconds from the start, for `rate` requests per second."""
    return [i / rate for i in range(int(rate * duration_s))]


async def _timed(call: Call, i: int, scheduled: float, result: RunResult) -> None:
    result.lateness.record(time.perf_counter() - scheduled)
    try:
        await call(i)
    except grpc.aio.AioRpcError as exc:
        result.errors[exc.code().name] += 1
        return
    result.latency.record(time.perf_counter() - scheduled)


async def open_loop(call: Call, offsets: Sequence[float]) -> RunResult:
    """Fires `call(i)` at each offset, whether or not earlier calls have returned."""
    result = RunResult()
    start = time.perf_counter()
    tasks = []
    for i, offset in enumerate(offsets):
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(_timed(call, i, scheduled, result)))
    await asyncio.gather(*tasks)
    result.elapsed_s = time.perf_counter() - start
    return result


async def sequential(call: Call, count: int) -> RunResult:
    """`count` calls one after another: latency without any queueing."""
    result = RunResult()
    start = time.perf_counter()
    for i in range(count):
        await _timed(call, i, time.perf_counter(), result)
    result.elapsed_s = time.perf_counter() - start
    return result


async def closed_loop(call: Call, concurrency: int, duration_s: float) -> RunResult:
    """`concurrency` callers, each sending its next request when the last returns."""
    result = RunResult()
    start = time.perf_counter()
    deadline = start + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await _timed(call, next(counter), time.perf_counter(), result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    return result
