"""`tandem bench edge`: the daemon against the floors under it, in one run.

Floors: raw tokenizer + ONNX Runtime on the same artifact (in this process), and a raw
grpc.aio echo on loopback (a subprocess, like the daemon). Each is measured twice:
back to back, and paced at the daemon's open-loop arrival rate. The paced floors are the
like-for-like limit: paced calls find colder caches than back-to-back ones, and the
open-loop generator's asyncio timers add their own lateness (reported). Both versions of
each target are reported.
"""

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.echo import echo_callable
from benchmarks.latency import LatencyRecorder
from benchmarks.loadgen import RunResult, closed_loop, fixed_rate, open_loop, sequential
from edge.student import SessionOptions, Student
from tandem import envs
from tandem.settings import TandemSettings
from tandem.subprocesses import announced_server
from tandem.tasks import TaskFile, banking77
from tandem.v1 import edge_pb2, edge_pb2_grpc


class EdgeBenchConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_EDGE_")

    student: Path = Field(
        default_factory=lambda: envs.TANDEM_CACHE_DIR / "models" / "banking77" / "student",
        description="Student artifact directory.",
    )
    task: TaskFile = Field(default_factory=banking77, description="The task file whose test split is replayed.")
    sequential_requests: int = Field(2000, ge=10, description="Requests for each sequential floor.")
    rate_rps: float = Field(200.0, gt=0, description="Open-loop arrival rate at the daemon.")
    duration_s: float = Field(10.0, gt=0, description="Length of each load phase.")
    concurrency: int = Field(32, ge=1, description="Callers in the maximum-throughput phase.")
    max_batch: int = Field(32, ge=1, description="The daemon's micro-batch limit.")
    intra_op_threads: int = Field(1, ge=1)


def run_edge_bench(cfg: EdgeBenchConfig, out: Path) -> dict[str, Any]:
    texts = [e.text for e in cfg.task.load("test")]
    results = asyncio.run(_measure(cfg, texts))
    results["targets"] = _targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    return results


async def _measure(cfg: EdgeBenchConfig, texts: list[str]) -> dict[str, Any]:
    raw = measure_raw(cfg, texts)
    echo = await measure_echo(cfg)
    batched = await measure_daemon(cfg, texts, cfg.max_batch)
    unbatched = await measure_daemon(cfg, texts, 1)
    return {
        "config": json.loads(cfg.model_dump_json()),
        "environment": {"cpus": psutil.cpu_count(), "student_version": raw.pop("version")},
        "raw_p50_ms": raw["p50_ms"],
        "raw_p99_ms": raw["p99_ms"],
        "raw_rps": raw["rps"],
        "raw_paced": raw["paced"],
        "echo_p50_ms": echo["p50_ms"],
        "echo_p99_ms": echo["p99_ms"],
        "echo_open_loop": echo["open_loop"],
        "daemon_p50_ms": batched["open_loop"]["p50_ms"],
        "daemon_p99_ms": batched["open_loop"]["p99_ms"],
        "daemon_rps": batched["max_rps"],
        "daemon_rps_unbatched": unbatched["max_rps"],
        "rss_mb": batched["rss_mb"],
        "daemon": batched,
        "daemon_unbatched": unbatched,
    }


def measure_raw(cfg: EdgeBenchConfig, texts: list[str]) -> dict[str, Any]:
    """Batch-1 tokenizer + ONNX Runtime with the daemon's session settings: back to back,
    then paced at `rate_rps` (time.sleep between calls, as requests would arrive)."""
    student = Student.load(cfg.student, SessionOptions(cfg.intra_op_threads))
    for text in texts[:100]:
        student.predict([text])
    rec = LatencyRecorder()
    started = time.perf_counter()
    for i in range(cfg.sequential_requests):
        t = time.perf_counter()
        student.predict([texts[i % len(texts)]])
        rec.record(time.perf_counter() - t)
    rps = cfg.sequential_requests / (time.perf_counter() - started)
    paced = LatencyRecorder()
    for i in range(min(cfg.sequential_requests, int(cfg.rate_rps * cfg.duration_s))):
        time.sleep(1 / cfg.rate_rps)
        t = time.perf_counter()
        student.predict([texts[i % len(texts)]])
        paced.record(time.perf_counter() - t)
    return {**rec.summary(), "rps": rps, "paced": paced.summary(), "version": student.version}


async def measure_echo(cfg: EdgeBenchConfig) -> dict[str, Any]:
    """A raw grpc.aio echo server in another process: sequential, then open loop at `rate_rps`."""
    payload = b"x" * 64
    with announced_server(["-m", "benchmarks.echo"]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo = echo_callable(channel)

            async def call(i: int) -> None:
                await echo(payload, timeout=5)

            await sequential(call, 100)
            back_to_back = await sequential(call, cfg.sequential_requests)
            paced = await open_loop(call, fixed_rate(cfg.rate_rps, cfg.duration_s))
    return {**back_to_back.latency.summary(), "open_loop": _open_loop_summary(paced, cfg.rate_rps)}


def _open_loop_summary(run: RunResult, rate_rps: float) -> dict[str, Any]:
    return {
        **run.latency.summary(),
        "rate_rps": rate_rps,
        "send_lateness_p50_ms": run.lateness.percentile_ms(50),
        "send_lateness_p99_ms": run.lateness.percentile_ms(99),
        "errors": dict(run.errors),
    }


async def measure_daemon(cfg: EdgeBenchConfig, texts: list[str], max_batch: int) -> dict[str, Any]:
    """`tandem edge serve` in a subprocess: open-loop latency, then maximum throughput."""
    daemon_cfg = {
        "listen": "127.0.0.1:0",
        "metrics_port": None,
        "tasks": {cfg.task.name: str(cfg.student)},
        "intra_op_threads": cfg.intra_op_threads,
        "max_batch": max_batch,
        "policy": {"mode": "edge_only"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edge.yaml"
        path.write_text(yaml.safe_dump(daemon_cfg))
        with announced_server(["-m", "tandem_cli", "edge", "serve", "--config", str(path)]) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = edge_pb2_grpc.EdgeStub(channel)
                requests = [edge_pb2.InferRequest(task=cfg.task.name, text=t.encode()) for t in texts]

                async def call(i: int) -> None:
                    await stub.Infer(requests[i % len(requests)], timeout=10)

                for i in range(200):
                    await call(i)
                paced = await open_loop(call, fixed_rate(cfg.rate_rps, cfg.duration_s))
                saturated = await closed_loop(call, cfg.concurrency, cfg.duration_s)
                rss = psutil.Process(server.process.pid).memory_info().rss
    return {
        "max_batch": max_batch,
        "open_loop": _open_loop_summary(paced, cfg.rate_rps),
        "max_rps": saturated.throughput_rps,
        "saturated": {**saturated.latency.summary(), "errors": dict(saturated.errors)},
        "rss_mb": rss / 2**20,
    }


def _targets(r: dict[str, Any]) -> dict[str, dict[str, float | bool]]:
    """The daemon's targets as value, limit and value/limit: first against back-to-back
    floors, then against floors paced like the daemon's load."""

    def target(value: float, limit: float, at_most: bool = True) -> dict[str, float | bool]:
        return {"value": value, "limit": limit, "ratio": value / limit, "met": value <= limit if at_most else value >= limit}

    p50, p99 = r["daemon_p50_ms"], r["daemon_p99_ms"]
    raw_paced, echo_paced = r["raw_paced"], r["echo_open_loop"]
    return {
        "daemon_p50 <= raw_p50 + echo_p50 + 0.3": target(p50, r["raw_p50_ms"] + r["echo_p50_ms"] + 0.3),
        "daemon_p99 <= 2 raw_p99 + 1": target(p99, 2 * r["raw_p99_ms"] + 1),
        "paced: daemon_p50 <= raw_p50 + echo_p50 + 0.3": target(p50, raw_paced["p50_ms"] + echo_paced["p50_ms"] + 0.3),
        "paced: daemon_p99 <= 2 raw_p99 + 1": target(p99, 2 * raw_paced["p99_ms"] + 1),
        "daemon_rps >= 0.6 raw_rps": target(r["daemon_rps"], 0.6 * r["raw_rps"], at_most=False),
        "rss_mb <= 200": target(r["rss_mb"], 200.0),
    }


def format_table(r: dict[str, Any]) -> str:
    rate = r["daemon"]["open_loop"]["rate_rps"]
    lines = [
        f"raw ONNX Runtime     p50 {r['raw_p50_ms']:.3f} ms  p99 {r['raw_p99_ms']:.3f} ms  {r['raw_rps']:.0f} req/s back to back",
        f"  paced {rate:.0f} req/s   p50 {r['raw_paced']['p50_ms']:.3f} ms  p99 {r['raw_paced']['p99_ms']:.3f} ms",
        f"grpc.aio echo        p50 {r['echo_p50_ms']:.3f} ms  p99 {r['echo_p99_ms']:.3f} ms sequential",
        f"  open loop {rate:.0f} req/s  p50 {r['echo_open_loop']['p50_ms']:.3f} ms  p99 {r['echo_open_loop']['p99_ms']:.3f} ms"
        f"  (generator send lateness p50 {r['echo_open_loop']['send_lateness_p50_ms']:.3f} ms)",
        f"daemon open loop {rate:.0f} req/s  p50 {r['daemon_p50_ms']:.3f} ms  p99 {r['daemon_p99_ms']:.3f} ms",
        f"daemon max           {r['daemon_rps']:.0f} req/s batched, {r['daemon_rps_unbatched']:.0f} req/s unbatched",
        f"daemon RSS           {r['rss_mb']:.0f} MB",
        "",
        f"{'target':48} {'value':>9} {'limit':>9} {'ratio':>6}  met",
    ]
    for name, t in r["targets"].items():
        lines.append(f"{name:48} {t['value']:9.3f} {t['limit']:9.3f} {t['ratio']:6.2f}  {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)
