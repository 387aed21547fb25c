"""The load generator itself: arrivals, percentile arithmetic, stopping, error reporting."""

import asyncio
import math

import grpc
import numpy as np
import pytest

from benchmarks.latency import LatencyRecorder
from benchmarks.loadgen import open_loop, poisson


def test_poisson_gaps_are_exponential_at_the_rate() -> None:
    rate, duration = 1000.0, 30.0
    offsets = np.array(poisson(rate, duration_s=duration, seed=1))
    gaps = np.diff(offsets)
    # Count within 4 sigma of rate x duration (sigma = sqrt(mean) for Poisson).
    assert abs(len(offsets) - rate * duration) < 4 * math.sqrt(rate * duration)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential: standard deviation equals the mean, P(gap > mean) = 1/e.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.02)
    # Poisson counts per window: variance equals mean (fixed-rate sends would give ~0).
    per_10ms = np.bincount((offsets / 0.01).astype(int))
    assert per_10ms.var() / per_10ms.mean() == pytest.approx(1.0, abs=0.1)
    assert offsets.max() < duration and np.all(gaps > 0)


def test_poisson_by_count_is_reproducible() -> None:
    assert len(poisson(50, count=123, seed=7)) == 123
    assert poisson(50, count=10, seed=7) == poisson(50, count=10, seed=7)
    assert poisson(50, count=10, seed=7) != poisson(50, count=10, seed=8)
    with pytest.raises(ValueError, match="exactly one"):
        poisson(50, count=10, duration_s=1)
    with pytest.raises(ValueError, match="rate"):
        poisson(0, count=10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    samples = rng.lognormal(mean=math.log(0.003), sigma=0.8, size=20_000)  # seconds, ~3 ms median
    rec = LatencyRecorder()
    for s in samples:
        rec.record(float(s))
    assert rec.count == len(samples)
    ordered_ms = np.sort(samples) * 1e3
    for p in (50.0, 90.0, 99.0, 99.9):
        # numpy's nearest-rank percentile is the k-th smallest sample. HDR keeps 3
        # significant digits (0.1%, plus its 1 us unit) and may round the rank by one.
        k = int(np.percentile(np.arange(1, len(samples) + 1), p, method="inverted_cdf"))
        assert ordered_ms[k - 1] == pytest.approx(np.percentile(samples, p, method="inverted_cdf") * 1e3)
        low, high = ordered_ms[k - 2] * (1 - 1e-3) - 1e-3, ordered_ms[k] * (1 + 1e-3) + 1e-3
        assert low <= rec.percentile_ms(p) <= high


def test_known_samples_give_exact_percentiles() -> None:
    rec = LatencyRecorder()
    for ms in range(1, 101):  # 1..100 ms
        rec.record(ms / 1e3)
    summary = rec.summary()
    assert summary["p50_ms"] == pytest.approx(50, rel=1e-3)
    assert summary["p90_ms"] == pytest.approx(90, rel=1e-3)
    assert summary["p99_ms"] == pytest.approx(99, rel=1e-3)
    assert summary["count"] == 100


async def test_open_loop_stops_by_itself_against_a_server_that_never_answers() -> None:
    async def hang(i: int) -> str:
        await asyncio.Event().wait()
        return "never"

    result = await asyncio.wait_for(open_loop(hang, poisson(200, count=20), drain_timeout_s=0.2), timeout=10)
    assert result.offered == 20
    assert result.latency.count == 0
    assert result.errors == {"UNFINISHED": 20}


async def test_open_loop_records_paths_and_reports_every_error() -> None:
    async def flaky(i: int) -> str:
        if i % 5 == 0:
            raise ValueError(f"bad {i}")
        return "local" if i % 2 else "escalated"

    result = await open_loop(flaky, [0.0] * 100)
    assert result.offered == 100
    assert result.errors == {"ValueError": 20}
    assert result.error_examples["ValueError"].startswith("bad ")
    assert result.paths["local"].count + result.paths["escalated"].count == result.latency.count == 80
    summary = result.summary()
    assert summary["errors"] == {"ValueError": 20} and set(summary["paths"]) == {"escalated", "local"}


async def test_grpc_statuses_are_counted_by_code() -> None:
    """A real grpc.aio server that refuses every third call."""

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if int(request) % 3 == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return request

    identity = lambda b: b  # noqa: E731
    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(handler, request_deserializer=identity, response_serializer=identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Echo", {"Echo": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary("/t.Echo/Echo", request_serializer=identity, response_deserializer=identity)

            async def call(i: int) -> None:
                await echo(str(i).encode(), timeout=5)

            result = await open_loop(call, poisson(500, count=90, seed=3))
    finally:
        await server.stop(0)
    assert result.errors == {"RESOURCE_EXHAUSTED": 30}
    assert result.error_examples["RESOURCE_EXHAUSTED"] == "queue full"
    assert result.latency.count == 60


async def test_latency_counts_queueing_behind_a_slow_server() -> None:
    """No coordinated omission: a server that takes 10 ms per request, one at a time, offered
    200 req/s (twice its capacity) for 1 s. Measured from the send, each request would take
    ~10 ms; from its schedule, the last ones have waited about half a second."""
    lock = asyncio.Lock()

    async def serial(i: int) -> str:
        async with lock:
            await asyncio.sleep(0.01)
        return "local"

    result = await open_loop(serial, [i / 200 for i in range(200)])
    assert result.latency.count == 200
    assert result.latency.percentile_ms(50) > 200  # half of them queued for hundreds of ms
    assert result.latency.percentile_ms(99) > 800
    # Throughput counts answers within the send window only: about the server's 100/s.
    assert 80 <= result.throughput_rps <= 110
