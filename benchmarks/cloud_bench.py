"""`tandem bench cloud`: each expert kind offline, served, and the overhead in between.

For each expert kind, in one run:
- vLLM offline throughput: the same engine and prompts with every request submitted at
  once (the most batching vLLM can do), in this process, before Serve starts;
- the generate expert's accuracy with each of its prompts (label names only, descriptions,
  descriptions plus retrieved examples), on one engine, in this process;
- served escalations per second at saturation through Serve's gRPC ingress;
- escalation overhead: client latency minus the expert's own compute, sequentially;
- floors: a Serve gRPC echo (same proxy, an app that returns at once) and a raw grpc.aio echo.
"""

import asyncio
import json
import os
import random
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
from cloud.experts.engine import local_engine
from tandem.settings import TandemSettings, load_config
from tandem.subprocesses import announced_server, free_port
from tandem.tasks import Task
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
    accuracy_queries: int = Field(
        500, ge=1, description="Test queries (a seeded sample of the generate expert's task) each of its prompts "
        "answers for its accuracy.",
    )
    seed: int = Field(0, description="Seed of the accuracy sample.")


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
    texts = [e.text for e in next(iter(cloud_cfg.tasks.values())).task.load("test")]
    offline_rps = {kind: (await offline(expert, texts[: cfg.requests[kind]], cloud_cfg.tasks[task].task))["rps"]
                   for kind, (task, expert) in routes.items()}
    accuracy = {}
    if "generate" in routes:
        task, expert = routes["generate"]
        accuracy = await prompt_accuracy(expert, cloud_cfg.tasks[task].task, cfg.accuracy_queries, cfg.seed,
                                         cfg.concurrency)
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
            **(accuracy if kind == "generate" else {}),
        }
    return {
        "config": json.loads(cfg.model_dump_json()),
        "environment": {"cpus": os.cpu_count()},
        "serve_echo_p50_ms": served["serve_echo_p50_ms"],
        "raw_echo_p50_ms": raw_echo,
        "experts": experts,
    }


async def offline(expert: Any, texts: list[str], task: Task, sequential_requests: int = 20) -> dict[str, float]:
    """One engine in this process: requests one at a time (latency), then all at once (the
    most batching vLLM can do; throughput)."""
    with local_engine(expert) as engine:
        runner = _runner(engine, expert, task)
        await runner.answer("warm up", task.name, "warm-0")  # grammar compile, first batch

        async def one(i: int) -> None:
            await runner.answer(texts[i % len(texts)], task.name, f"offline-seq-{i}")

        latency = (await sequential(one, sequential_requests)).latency
        started = time.perf_counter()
        await asyncio.gather(*(runner.answer(t, task.name, f"offline-{i}") for i, t in enumerate(texts)))
        return {"rps": len(texts) / (time.perf_counter() - started), "p50_ms": latency.percentile_ms(50),
                "p99_ms": latency.percentile_ms(99)}


# ExpertConfig.prompt -> the key of the generate expert's accuracy with it.
PROMPT_KEYS = {"names": "accuracy_names_only", "descriptions": "accuracy_descriptions", "retrieval": "accuracy_retrieval"}


async def prompt_accuracy(expert: Any, task: Task, queries: int, seed: int, concurrency: int) -> dict[str, Any]:
    """The generate expert's accuracy on `queries` test examples of `task` (a seeded sample)
    with each prompt, one engine for all, `concurrency` answers at a time (a replica's
    max_ongoing_requests: more would queue the answers' scoring requests behind other
    answers until their prompts left the prefix cache)."""
    examples = random.Random(seed).sample(task.load("test"), queries)
    results: dict[str, Any] = {"accuracy_queries": len(examples), "prompts": {}}
    with local_engine(expert) as engine:
        for prompt, key in PROMPT_KEYS.items():
            started = time.perf_counter()
            # Retrieval builds or reads the task's example index here.
            runner = _runner(engine, expert.model_copy(update={"prompt": prompt}), task)
            init_s = time.perf_counter() - started
            await runner.answer("warm up", task.name, f"warm-{prompt}")
            slots = asyncio.Semaphore(concurrency)

            async def answer(i: int, text: str) -> Any:
                async with slots:
                    return await runner.answer(text, task.name, f"accuracy-{prompt}-{i}")

            started = time.perf_counter()
            answers = await asyncio.gather(*(answer(i, e.text) for i, e in enumerate(examples)))
            seconds = time.perf_counter() - started
            results[key] = sum(a.label == e.label for a, e in zip(answers, examples)) / len(examples)
            results["prompts"][prompt] = {
                "accuracy": results[key], "seconds": seconds, "answers_per_s": len(examples) / seconds,
                "runner_init_s": init_s, "out_of_scope_share": sum(a.label == task.oos_label for a in answers) / len(answers),
                "mean_confidence": sum(a.confidence for a in answers) / len(answers),
            }
    return results


def _runner(engine: Any, expert: Any, task: Task) -> Any:
    if expert.kind == "classify":
        from cloud.experts.classify import ClassifyRunner

        return ClassifyRunner(engine, expert, {task.name: task})
    from cloud.experts.generate import GenerateRunner

    return GenerateRunner(engine, expert, {task.name: task})


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
    generate = r["experts"].get("generate", {})
    if "prompts" in generate:
        lines.append(f"\ngenerate accuracy on {generate['accuracy_queries']} test queries:")
        for prompt, run in generate["prompts"].items():
            lines.append(f"  {prompt:13} {run['accuracy']:6.1%}  {run['seconds']:6.1f} s ({run['answers_per_s']:.2f}/s)")
        lines.append("target: retrieval >= 2 x names only")
    return "\n".join(lines)
