"""`tandem bench suite` (`make bench`): the standard load tests, with their baselines and
floors measured in the same run, written as JSON, Markdown and plots.

1. Floors: raw ONNX Runtime and a raw grpc.aio echo (in `tandem bench edge`'s way), and
   the vLLM classify expert offline (in `tandem bench cloud`'s way).
2. The generator's own capacity: Poisson load on the echo server at rising rates.
3. With the cloud up, the same Poisson-timed replay of the task's test split through three
   edge daemons: edge_only, cloud_only and the cascade at the configured policy, each run as
   `tandem bench load` runs one (`benchmarks.load`).
4. A threshold sweep: the cascade at several thresholds.
5. A step response: a fleet of simulated edges, every request escalated, offered load
   raised in steps until the cloud saturates.

The task is a task file (default: the shipped one); its expert is the one the shipped cloud
config (cloud/cloud.yaml) routes the task's name to.
"""

import asyncio
import datetime
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from benchmarks.echo import echo_callable
from benchmarks.edge_bench import EdgeBenchConfig, measure_echo, measure_raw
from benchmarks.edge_load import replay
from benchmarks.load import edge_target, measure, sequence
from benchmarks.loadgen import open_loop, poisson
from benchmarks.monitor import Monitor
from benchmarks.report import write_report
from benchmarks.system import Cloud, cloud, cloud_config, edge_config, edge_daemon
from tandem.settings import ConfigError, TandemSettings
from tandem.subprocesses import announced_server
from tandem.tasks import Example, Task, TaskFile, banking77

log = logging.getLogger(__name__)

# Each request's deadline in the runs: long enough that only a hung request fails.
REQUEST_TIMEOUT_S = 10.0


class SuiteConfig(TandemSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_BENCH_")

    task: TaskFile = Field(default_factory=banking77, description="The task file: its test split is the queries; "
                           "cloud/cloud.yaml's route of its name, the expert.")
    train_config: Path | None = Field(
        None, description="Training config (fits, model cache); its task is replaced by `task`. Default: built in.")
    rate_rps: float = Field(50.0, gt=0, description="Poisson arrival rate of the baseline and sweep runs.")
    queries: int | None = Field(
        None, ge=10, description="Queries per baseline run (the same sequence for each); None: the whole test split."
    )
    sweep_thresholds: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], description="Cascade thresholds of the sweep."
    )
    sweep_queries: int = Field(600, ge=10, description="Queries per sweep point.")
    step_rates: list[float] = Field(
        default_factory=lambda: [20, 40, 80, 120, 160, 240, 320], description="Offered load of each step, req/s."
    )
    step_duration_s: float = Field(10.0, gt=0, description="Length of each step.")
    fleet_edges: int = Field(200, ge=1, description="Simulated edges in the step response (fleet mode).")
    generator_rates: list[float] = Field(
        default_factory=lambda: [1000, 2000, 3000, 4000], description="Offered load on the echo server, req/s."
    )
    generator_duration_s: float = Field(5.0, gt=0)
    seed: int = 0


def run_suite(cfg: SuiteConfig, out_root: Path) -> Path:
    """Runs everything; returns the results folder."""
    from cloud.prepare import ensure_trained, local_train_config

    train_cfg = local_train_config(cfg.train_config).model_copy(update={"task": cfg.task})
    teacher = ensure_trained(train_cfg, "teacher")
    ensure_trained(train_cfg, "student")
    out = out_root / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)
    report = asyncio.run(_measure(cfg, train_cfg))
    report["models"] = {"expert_test_accuracy": teacher["metrics"]["test_accuracy"]}
    write_report(report, out)
    return out


def expert_route(task: Task) -> tuple[str, dict[str, Any]]:
    """The expert that the shipped cloud config routes `task`'s name to, and that config
    reduced to this expert, with the route's task replaced by `task`."""
    cfg = cloud_config()
    route = cfg["tasks"].get(task.name)
    if route is None:
        raise ConfigError(f"cloud/cloud.yaml: tasks has no route {task.name!r} (the task's name); add one naming "
                          f"its expert (routes: {sorted(cfg['tasks'])})")
    expert = route["expert"]
    tasks = {name: t for name, t in cfg["tasks"].items() if t["expert"] == expert}
    tasks[task.name] = {**route, "task": task.model_dump(mode="json")}
    return expert, {**cfg, "tasks": tasks, "experts": [e for e in cfg["experts"] if e["name"] == expert]}


async def _measure(cfg: SuiteConfig, train_cfg: Any) -> dict[str, Any]:
    task = train_cfg.task
    test = task.load("test")
    student = train_cfg.model_dir("student")
    queries = sequence(test, cfg.queries or len(test), cfg.seed)
    expert, cloud_cfg = expert_route(task)
    report: dict[str, Any] = {"config": json.loads(cfg.model_dump_json()), "environment": _environment()}
    log.info("floors")
    report["floors"] = await _floors(cfg, student, train_cfg, cloud_cfg, [e.text for e in test])
    log.info("generator capacity (Poisson, against the raw echo server)")
    report["generator"] = await _generator_capacity(cfg)
    # The whole system runs, feedback capture included, into a scratch store and registry.
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        work = Path(tmp)
        with cloud({**cloud_cfg, "feedback_uri": str(work / "feedback"), "registry_dir": str(work / "registry")}) as c:
            runs = {}
            for name, policy in (("edge_only", {"mode": "edge_only"}), ("cloud_only", {"mode": "cloud_only"}), ("cascade", {})):
                log.info("%s: %d queries, Poisson %g req/s", name, len(queries), cfg.rate_rps)
                runs[name] = await _daemon_run(_edge(task.name, student, c, work, name, policy), c, task, queries,
                                               cfg.rate_rps, cfg.seed, name)
            report["runs"] = runs
            report["sweep"] = await _sweep(cfg, c, task, student, test, work)
            report["step_response"] = await _step_response(cfg, c, task, student, test, work)
    report["expert"] = expert
    return report


def _edge(task: str, student: Path, c: Cloud, work: Path, name: str, policy: dict[str, Any]) -> dict[str, Any]:
    return edge_config(task, student, c, name, policy=policy, feedback={"outbox": str(work / f"outbox-{name}.sqlite3")})


async def _daemon_run(edge_cfg: dict[str, Any], c: Cloud, task: Task, queries: list[Example], rate: float, seed: int,
                      name: str) -> dict[str, Any]:
    with edge_daemon(edge_cfg) as daemon:
        async with edge_target(f"127.0.0.1:{daemon.port}", REQUEST_TIMEOUT_S) as infer:
            monitor = Monitor([daemon.process.pid], c.metrics_url)
            result = await measure(infer, task.name, queries, poisson(rate, count=len(queries), seed=seed),
                                   task.oos_label, name, warmup=50, during=monitor)
    result.update(monitor.summary(), policy=edge_cfg["policy"], offered_rps=rate)
    _log_run(name, result)
    return result


async def _sweep(cfg: SuiteConfig, c: Cloud, task: Task, student: Path, test: list[Example], work: Path) -> list[dict[str, Any]]:
    queries = sequence(test, cfg.sweep_queries, cfg.seed + 1)
    points = []
    for threshold in cfg.sweep_thresholds:
        log.info("sweep: threshold %g", threshold)
        name = f"sweep-{threshold:g}"
        edge_cfg = _edge(task.name, student, c, work, name, {"mode": "threshold", "threshold": threshold})
        points.append({"threshold": threshold, **await _daemon_run(edge_cfg, c, task, queries, cfg.rate_rps, cfg.seed, name)})
    return points


async def _step_response(cfg: SuiteConfig, c: Cloud, task: Task, student: Path, test: list[Example], work: Path) -> dict[str, Any]:
    from benchmarks.fleet import Fleet

    steps = []
    edge_cfg = _edge(task.name, student, c, work, "fleet", {"mode": "cloud_only"})
    async with Fleet(edge_cfg, cfg.fleet_edges) as fleet:
        saturated_at, capacity = None, None
        for i, rate in enumerate(cfg.step_rates):
            log.info("step response: %d simulated edges, every request escalated, %g req/s", cfg.fleet_edges, rate)
            queries = sequence(test, int(rate * cfg.step_duration_s), cfg.seed + 2 + i)
            with Monitor([os.getpid()], c.metrics_url) as monitor:
                step = await replay(fleet.edges, task.name, queries, poisson(rate, count=len(queries), seed=cfg.seed + i),
                                    f"step-{i}", task.oos_label)
            step.update(monitor.summary(), offered_rps=rate)
            # This process is the whole fleet plus the load generator, not one edge.
            step["bench_cpu_cores"], step["bench_rss_mb_max"] = step.pop("edge_cpu_cores"), step.pop("edge_rss_mb_max")
            step.pop("cdf")
            _log_run(f"{rate:g} req/s", step)
            steps.append(step)
            if not _saturated(step):
                capacity = step["throughput_rps"] * step["by_path"].get("escalated", {}).get("share", 0.0)
            else:
                saturated_at = saturated_at or rate
                if len([s for s in steps if _saturated(s)]) == 2:
                    break
    return {"edges": cfg.fleet_edges, "deadline_ms": edge_cfg["cloud"]["deadline_ms"], "steps": steps,
            "saturated_at_rps": saturated_at, "capacity_rps": capacity}


def _saturated(step: dict[str, Any]) -> bool:
    """Every request is sent to the cloud: saturated once it answers less than 95% of them
    in time (the rest fall back locally) or any request fails."""
    return (step["fallback_rate"] or 0) > 0.05 or bool(step["errors"])


async def _floors(cfg: SuiteConfig, student: Path, train_cfg: Any, cloud_cfg: dict[str, Any],
                  texts: list[str]) -> dict[str, Any]:
    from benchmarks.cloud_bench import offline
    from cloud.config import CloudConfig

    bench = EdgeBenchConfig(student=student, task=train_cfg.task, rate_rps=cfg.rate_rps, duration_s=5.0, sequential_requests=1000)
    raw = measure_raw(bench, texts)
    echo = await measure_echo(bench)
    expert = next(iter(CloudConfig.model_validate(cloud_cfg).experts))
    vllm = await offline(expert, texts[:400], train_cfg.task)
    # Back to back, and paced at the runs' rate: the like-for-like floor (see `tandem bench edge`).
    floors = {
        "raw_onnx": {**{k: raw[k] for k in ("p50_ms", "p99_ms", "rps")}, "paced_p50_ms": raw["paced"]["p50_ms"]},
        "grpc_echo": {"p50_ms": echo["p50_ms"], "p99_ms": echo["p99_ms"], "paced_p50_ms": echo["open_loop"]["p50_ms"]},
        "vllm_offline": vllm,
    }
    log.info("floors: %s", json.dumps(floors))
    return floors


async def _generator_capacity(cfg: SuiteConfig) -> list[dict[str, Any]]:
    runs = []
    with announced_server(["-m", "benchmarks.echo"]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            echo = echo_callable(channel)

            async def call(i: int) -> None:
                await echo(b"x" * 64, timeout=5)

            await open_loop(call, poisson(500, count=500))
            for rate in cfg.generator_rates:
                r = (await open_loop(call, poisson(rate, duration_s=cfg.generator_duration_s, seed=cfg.seed))).summary()
                runs.append({"offered_rps": rate, "achieved_rps": r["throughput_rps"], "p50_ms": r["p50_ms"],
                             "p99_ms": r["p99_ms"], "send_lateness_p99_ms": r["send_lateness_p99_ms"], "errors": r["errors"]})
                log.info("offered %6.0f req/s  achieved %6.0f  p50 %.2f ms  p99 %.2f ms  send lateness p99 %.2f ms  errors %s",
                         rate, r["throughput_rps"], r["p50_ms"], r["p99_ms"], r["send_lateness_p99_ms"], r["errors"])
    return runs


def _log_run(name: str, r: dict[str, Any]) -> None:
    if not r["answered"]:
        log.warning("%s: no answers; errors %s %s", name, r["errors"], r["error_examples"])
        return
    paths = "  ".join(f"{p} {v['share']:.0%} acc {v['accuracy']:.1%}" for p, v in r["by_path"].items())
    log.info("%s: p50 %.2f ms  p99 %.2f ms  %.0f req/s  accuracy %.1f%%  escalated %.1f%%  [%s]  errors %s",
             name, r["p50_ms"], r["p99_ms"], r["throughput_rps"], 100 * r["accuracy"], 100 * r["escalation_rate"],
             paths, r["errors"])


def _environment() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30, "python": platform.python_version(),
            "platform": platform.platform(), "ci": os.environ.get("CI") == "true"}
