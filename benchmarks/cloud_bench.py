"""`tandem bench cloud`: each expert kind offline, served, and the overhead in between.

For each expert kind, in one run:
- vLLM offline throughput: the same engine and prompts with every request submitted at
  once (the most batching vLLM can do), in this process, before Serve starts;
- served escalations per second at saturation through Serve's gRPC ingress;
- escalation overhead: client latency minus the expert's own compute, sequentially;
- floors: a Serve gRPC echo (same proxy, an app that returns at once) and a raw grpc.aio echo.
"""

import asyncio
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

import yaml

from benchmarks.echo import echo_callable
from benchmarks.latency import LatencyRecorder
from benchmarks.loadgen import sequential
from cloud.config import CloudConfig
from tandem.settings import TandemSettings, load_config
from tandem.subprocesses import announced_server, free_port
from tandem.v1 import expert_pb2, expert_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


class CloudBenchConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_CLOUD_")

    cloud_config: Path = Field(ROOT / "cloud" / "cloud.yaml", description="The app to benchmark.")
    requests: dict[str, int] = Field(
        default_factory=lambda: {"classify": 400, "generate": 64},
        description="Escalations per expert kind for the offline and served throughput runs.",
    )
    concurrency: int = Field(32, ge=1, description="Callers at saturation.")
    sequential_requests: int = Field(50, ge=5, description="Sequential escalations for the overhead.")


def run_cloud_bench(cfg: CloudBenchConfig, out: Path) -> dict[str, Any]:
    cloud_cfg = load_config(CloudConfig, cfg.cloud_config)
    results = asyncio.run(_measure(cfg, cloud_cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    return results


def _routes(cloud_cfg: CloudConfig) -> dict[str, tuple[str, Any]]:
    """Expert kind -> (task that routes to it, its ExpertConfig)."""
    by_name = {e.name: e for e in cloud_cfg.experts}
    return {by_name[t.expert].kind: (name, by_name[t.expert]) for name, t in cloud_cfg.tasks.items()}


async def _measure(cfg: CloudBenchConfig, cloud_cfg: CloudConfig) -> dict[str, Any]:
    routes = _routes(cloud_cfg)
    texts = [e.text for e in next(iter(cloud_cfg.tasks.values())).spec.load("test")]
    offline_rps = {kind: (await offline(expert, texts[: cfg.requests[kind]], cloud_cfg.tasks[task].spec.label_names()))["rps"]
                   for kind, (task, expert) in routes.items()}
    raw_echo = await _raw_echo_p50()
    served = await _served(cfg, routes, texts)
    experts = {}
    for kind in routes:
        s = served["experts"][kind]
        experts[kind] = {
            "offline_rps": offline_rps[kind],
            "served_rps": s["served_rps"],
            "served_over_offline": s["served_rps"] / offline_rps[kind],
            "overhead_p50_ms": s["overhead_p50_ms"],
            "escalate_p50_ms": s["escalate_p50_ms"],
            "expert_p50_ms": s["expert_p50_ms"],
            "errors": s["errors"],
        }
    return {
        "config": json.loads(cfg.model_dump_json()),
        "environment": {"cpus": os.cpu_count()},
        "serve_echo_p50_ms": served["serve_echo_p50_ms"],
        "raw_echo_p50_ms": raw_echo,
        "experts": experts,
    }


async def offline(expert: Any, texts: list[str], labels: list[str], sequential_requests: int = 20) -> dict[str, float]:
    """One engine in this process: requests one at a time (latency), then all at once (the
    most batching vLLM can do; throughput)."""
    from cloud.experts.engine import build_engine

    os.environ.update(expert.env)
    engine = build_engine(expert)
    runner: Any = None
    try:
        if expert.kind == "classify":
            from cloud.experts.classify import ClassifyRunner, checkpoint_labels

            runner = ClassifyRunner(engine, checkpoint_labels(expert.model_path()), expert.max_model_len)
        else:
            from cloud.experts.generate import GenerateRunner

            runner = GenerateRunner(engine, expert.max_model_len)
        await runner.answer("warm up", labels, "warm-0")  # grammar compile, first batch

        async def one(i: int) -> None:
            await runner.answer(texts[i % len(texts)], labels, f"offline-seq-{i}")

        latency = (await sequential(one, sequential_requests)).latency
        started = time.perf_counter()
        await asyncio.gather(*(runner.answer(t, labels, f"offline-{i}") for i, t in enumerate(texts)))
        return {"rps": len(texts) / (time.perf_counter() - started), "p50_ms": latency.percentile_ms(50),
                "p99_ms": latency.percentile_ms(99)}
    finally:
        engine.shutdown()
        # Collected now, not at interpreter exit, where vLLM's __del__ fails on torn-down modules.
        del engine
        runner = None
        gc.collect()


async def _raw_echo_p50() -> float:
    with announced_server(["-m", "benchmarks.echo"]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo = echo_callable(channel)

            async def call(i: int) -> None:
                await echo(b"x" * 64, timeout=5)

            await sequential(call, 100)
            return (await sequential(call, 500)).latency.percentile_ms(50)


async def _served(cfg: CloudBenchConfig, routes: dict[str, tuple[str, Any]], texts: list[str]) -> dict[str, Any]:
    from ray import serve

    from benchmarks.serve_echo import EchoExpert
    from cloud.server import running_cloud

    # The system as deployed, started as `tandem cloud serve` starts it, feedback capture
    # included, into a scratch store and registry.
    scratch = Path(tempfile.mkdtemp(prefix="tandem-bench-cloud-"))
    config = scratch / "cloud.yaml"
    settings = yaml.safe_load(cfg.cloud_config.read_text())
    # Insecure: this measures Serve and the experts from Serve's own port; what the TLS proxy
    # adds is `tandem bench security`'s measure.
    settings.update(grpc_port=free_port(), http_port=free_port(), ray_metrics_port=free_port(), insecure=True,
                    feedback_uri=str(scratch / "feedback"), registry_dir=str(scratch / "registry"))
    config.write_text(yaml.safe_dump(settings))
    try:
        with running_cloud(config) as served_cfg:
            serve.run(EchoExpert.bind(), name="echo", route_prefix="/echo")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{served_cfg.grpc_port}") as channel:
                stub = expert_pb2_grpc.ExpertStub(channel)
                echo = [("application", "echo")]

                async def echo_call(i: int) -> None:
                    await stub.Escalate(expert_pb2.EscalateRequest(task="echo", text="x"), metadata=echo, timeout=10)

                await sequential(echo_call, 100)
                serve_echo = (await sequential(echo_call, 500)).latency.percentile_ms(50)
                experts = {kind: await _served_expert(cfg, stub, expert.name, task, texts[: cfg.requests[kind]], kind)
                           for kind, (task, expert) in routes.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"serve_echo_p50_ms": serve_echo, "experts": experts}


async def _served_expert(cfg: CloudBenchConfig, stub: expert_pb2_grpc.ExpertStub, app: str, task: str,
                         texts: list[str], kind: str) -> dict[str, Any]:
    metadata = [("application", app)]
    overhead, expert = LatencyRecorder(), LatencyRecorder()

    async def escalate(i: int) -> expert_pb2.EscalateResponse:
        request = expert_pb2.EscalateRequest(task=task, text=texts[i % len(texts)], request_id=f"bench-{kind}-{i}")
        return await stub.Escalate(request, metadata=metadata, timeout=120)

    async def call(i: int) -> None:
        await escalate(i)

    async def measured(i: int) -> None:
        started = time.perf_counter()
        r = await escalate(i)
        total_ms = (time.perf_counter() - started) * 1e3
        overhead.record(max(total_ms - r.expert_ms, 0.001) / 1e3)
        expert.record(r.expert_ms / 1e3)

    await sequential(call, 5)
    timed = await sequential(measured, cfg.sequential_requests)
    # Saturation: as many requests as the offline run, `concurrency` at a time.
    counter = iter(range(len(texts)))
    started = time.perf_counter()
    await asyncio.gather(*(_drain(call, counter) for _ in range(cfg.concurrency)))
    served_rps = len(texts) / (time.perf_counter() - started)
    return {
        "served_rps": served_rps,
        "overhead_p50_ms": overhead.percentile_ms(50),
        "escalate_p50_ms": timed.latency.percentile_ms(50),
        "expert_p50_ms": expert.percentile_ms(50),
        "errors": dict(timed.errors),
    }


async def _drain(call: Any, counter: Any) -> None:
    for i in counter:
        await call(i)


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"raw grpc.aio echo p50 {r['raw_echo_p50_ms']:.3f} ms   Serve gRPC echo p50 {r['serve_echo_p50_ms']:.3f} ms",
        "",
        f"{'expert':10} {'offline/s':>10} {'served/s':>9} {'ratio':>6} {'escalate p50':>13} {'expert p50':>11} {'overhead p50':>13} {'limit':>7}",
    ]
    for kind, e in r["experts"].items():
        limit = r["serve_echo_p50_ms"] + 2
        lines.append(
            f"{kind:10} {e['offline_rps']:10.1f} {e['served_rps']:9.1f} {e['served_over_offline']:6.2f} "
            f"{e['escalate_p50_ms']:10.1f} ms {e['expert_p50_ms']:8.1f} ms {e['overhead_p50_ms']:10.2f} ms {limit:5.2f} ms"
        )
    lines.append("\ntargets: served >= 0.8 x offline; overhead p50 <= Serve echo p50 + 2 ms")
    return "\n".join(lines)
