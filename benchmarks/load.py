"""`tandem bench load`: open-loop load on a running deployment with the user's labelled data.

The target is an edge daemon (`tandem.v1.Edge/Infer`), or, with `cloud`, a cloud's gRPC
ingress (`tandem.v1.Expert/Escalate` through its mTLS proxy, as a cloud-only edge would call
it: the task's expert application comes from Fleet.GetRoutes). Arrivals are Poisson (seeded)
at a rate, or at the rates of a schedule of steps; latency is measured from each request's
scheduled send time.

The data's rows whose label is not in the task's label set are queries that fit no intent:
their truth is the task's out-of-scope label (counted as `unknown_label_rows`), and they are
the open rows of `open_recall` (see `benchmarks.edge_load`).

`make bench`'s runs (`benchmarks.suite`) go through `edge_target` and `measure` too.
"""

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
from pydantic import BeforeValidator, Field, model_validator

from benchmarks.edge_load import Infer, replay
from benchmarks.loadgen import poisson
from tandem.contract import SafeName
from tandem.settings import ConfigError, Section
from tandem.tasks import Example, Task, TaskFile, read_examples
from tandem.v1 import edge_pb2, edge_pb2_grpc, expert_pb2

log = logging.getLogger(__name__)

# Requests sent before the measured run (connections, routes, the model's first runs), 50 a second.
WARMUP_GAP_S = 0.02


class Step(Section):
    """One step of a rate schedule."""

    rate: float = Field(ge=0, description="Poisson arrival rate, requests per second (0: a pause).")
    duration: float = Field(gt=0, description="Seconds.")


def parse_schedule(value: Any) -> Any:
    """'10:30,50:30' (10 req/s for 30 s, then 50 req/s for 30 s) becomes steps; a list of
    steps passes through."""
    if not isinstance(value, str):
        return value
    steps = []
    for item in value.split(","):
        rate, sep, duration = item.strip().partition(":")
        if not sep:
            raise ValueError(f"step {item.strip()!r} is not RATE:SECONDS (e.g. 10:30,50:30)")
        steps.append({"rate": rate, "duration": duration})
    return steps


Schedule = Annotated[list[Step], BeforeValidator(parse_schedule)]


def schedule_offsets(steps: Sequence[Step], seed: int = 0) -> list[float]:
    """Send offsets of a Poisson process whose rate changes step by step (exponential gaps
    are memoryless, so each step starts its own process at the step's start)."""
    offsets: list[float] = []
    start = 0.0
    for i, step in enumerate(steps):
        if step.rate > 0:
            offsets += [start + t for t in poisson(step.rate, duration_s=step.duration, seed=seed + i)]
        start += step.duration
    return offsets


class LoadConfig(Section):
    """What `tandem bench load` runs; the fields are its flags."""

    target: str = Field(description="host:port (or unix:///path) of the edge daemon, or with `cloud`, of the "
                        "cloud's gRPC ingress (its TLS proxy).")
    task: TaskFile = Field(description="The task file: label set, out-of-scope label, text and label columns.")
    data: Path = Field(description="Labelled queries, CSV or JSONL with the task's text and label columns.")
    route: SafeName | None = Field(None, description="The task name on the wire; default: the task file's name.")
    cloud: bool = Field(False, description="Cloud-only: call the cloud's Expert/Escalate, not an edge.")
    ca: Path | None = Field(None, description="TLS: the CA certificate the target's server certificate chains to.")
    cert: Path | None = Field(None, description="TLS: the client certificate (`tandem ca enroll DEVICE`).")
    key: Path | None = Field(None, description="TLS: the client's private key.")
    rate: float | None = Field(None, gt=0, description="Poisson arrival rate, requests per second.")
    schedule: Schedule | None = Field(None, description="Rate steps, RATE:SECONDS,... instead of `rate`.")
    duration: float | None = Field(None, gt=0, description="Seconds of load at `rate`.")
    count: int | None = Field(None, ge=1, description="Requests to send; with `schedule`, at most this many. "
                              "Neither duration nor count: one request per data row.")
    warmup: int = Field(20, ge=0, description="Requests sent (and not measured) before the run.")
    timeout: float = Field(10.0, gt=0, description="Deadline of each request, seconds.")
    seed: int = Field(0, description="Seeds the arrivals and the order of the rows.")

    @model_validator(mode="after")
    def _one_load_shape(self) -> "LoadConfig":
        if (self.rate is None) == (self.schedule is None):
            raise ValueError("give rate (--rate) or schedule (--schedule), exactly one")
        if self.schedule is not None:
            if self.duration is not None:
                raise ValueError("schedule sets the duration; give count (--count) to cap the requests instead")
            if not any(step.rate > 0 for step in self.schedule):
                raise ValueError("schedule: every step has rate 0")
        elif self.duration is not None and self.count is not None:
            raise ValueError("give duration (--duration) or count (--count), not both")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> "LoadConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert (--cert) and key (--key) go together")
        if self.cert is not None and self.ca is None:
            raise ValueError("cert and key need ca (--ca), the CA the target's certificate chains to")
        if self.cloud and self.ca is not None and self.cert is None:
            raise ValueError("cloud: the proxy requires a device certificate: give cert and key "
                             "(`tandem ca enroll DEVICE` writes ca.crt, device.crt and device.key)")
        return self

    @property
    def route_name(self) -> str:
        return self.route or self.task.name


def truth_examples(task: Task, data: Path) -> tuple[list[Example], dict[str, Any]]:
    """The data's rows with their truth (an unknown label becomes the out-of-scope label),
    and what the data holds."""
    try:
        rows = read_examples(data, task.text_column, task.label_column)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: {exc}") from exc
    if not rows:
        raise ConfigError(f"data: {data} holds no rows")
    labels = set(task.label_names())
    unknown = [e for e in rows if e.label not in labels]
    examples = [Example(e.text, e.label if e.label in labels else task.oos_label) for e in rows]
    info = {"path": str(data), "rows": len(rows), "unknown_label_rows": len(unknown),
            "unknown_labels": sorted({e.label for e in unknown})[:20],
            "out_of_scope_rows": sum(e.label == task.oos_label for e in examples)}
    return examples, info


def sequence(examples: Sequence[Example], count: int, seed: int) -> list[Example]:
    """`count` examples in a seeded order (repeating them if count exceeds them)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(count)]


def arrivals(cfg: LoadConfig, rows: int) -> list[float]:
    """The run's send offsets, in seconds from its start."""
    if cfg.schedule is not None:
        return schedule_offsets(cfg.schedule, cfg.seed)[: cfg.count]
    assert cfg.rate is not None  # the config's validator
    if cfg.duration is not None:
        return poisson(cfg.rate, duration_s=cfg.duration, seed=cfg.seed)
    return poisson(cfg.rate, count=cfg.count or rows, seed=cfg.seed)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc}") from exc


def _channel(target: str, ca: Path | None, cert: Path | None, key: Path | None) -> grpc.aio.Channel:
    if ca is None:
        return grpc.aio.insecure_channel(target)
    client = (_read(key, "key"), _read(cert, "cert")) if key is not None and cert is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(_read(ca, "ca"), *client)
    return grpc.aio.secure_channel(target, credentials)


@contextlib.asynccontextmanager
async def edge_target(target: str, timeout_s: float, ca: Path | None = None, cert: Path | None = None,
                      key: Path | None = None) -> AsyncIterator[Infer]:
    """An edge daemon's Infer, each call with a deadline of `timeout_s`."""
    channel = _channel(target, ca, cert, key)
    stub = edge_pb2_grpc.EdgeStub(channel)

    async def infer(request: edge_pb2.InferRequest) -> edge_pb2.InferResponse:
        return await stub.Infer(request, timeout=timeout_s)

    try:
        yield infer
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def cloud_target(target: str, timeout_s: float, ca: Path | None = None, cert: Path | None = None,
                       key: Path | None = None) -> AsyncIterator[Infer]:
    """A cloud's Expert/Escalate, called as a cloud-only edge does (`edge.cloud_client`: the
    task's application from Fleet.GetRoutes, retries on UNAVAILABLE, `timeout_s` for all of
    it), answering as an edge would: source CLOUD. Without certificates, plaintext to an
    insecure development cloud."""
    from edge.cloud_client import CloudClient
    from edge.config import CloudLinkConfig, TLSFiles

    tls = TLSFiles(ca=ca, cert=cert, key=key) if ca is not None else None
    client = CloudClient(CloudLinkConfig(target=target, tls=tls, insecure=tls is None, deadline_ms=timeout_s * 1000))

    async def infer(request: edge_pb2.InferRequest) -> edge_pb2.InferResponse:
        answer = await client.escalate(expert_pb2.EscalateRequest(
            request_id=request.request_id, task=request.task, text=request.text.decode()))
        return edge_pb2.InferResponse(
            request_id=request.request_id, task=request.task, label=answer.label, confidence=answer.confidence,
            source=edge_pb2.CLOUD, expert=answer.expert, out_of_scope=answer.out_of_scope,
            label_set_version=answer.label_set_version)

    try:
        yield infer
    finally:
        await client.close()


async def measure(infer: Infer, route: str, queries: Sequence[Example], offsets: Sequence[float], oos_label: str,
                  run: str, warmup: int = 20,
                  during: contextlib.AbstractContextManager[Any] | None = None) -> dict[str, Any]:
    """`warmup` requests, then the measured open-loop replay of `queries` at `offsets`, inside
    `during` (e.g. a resource monitor) when given."""
    if warmup:
        warm = await replay([infer], route, queries[:warmup], [WARMUP_GAP_S * i for i in range(warmup)], f"warm-{run}",
                            oos_label)
        if warm["errors"]:
            log.warning("%s: warm-up errors %s %s", run, warm["errors"], warm["error_examples"])
    with during or contextlib.nullcontext():
        return await replay([infer], route, queries, offsets, run, oos_label)


def run_load(cfg: LoadConfig, out: Path) -> dict[str, Any]:
    """Runs the load; writes OUT/load.json and the plots; returns what load.json holds."""
    from benchmarks.plots import plot_load

    examples, data = truth_examples(cfg.task, cfg.data)
    offsets = arrivals(cfg, len(examples))
    if not offsets:
        raise ConfigError("the run would send no request: raise rate, duration or count")
    queries = sequence(examples, len(offsets), cfg.seed)
    log.info("%d requests to %s (%s), task %s as %r: %s", len(offsets), cfg.target, "cloud" if cfg.cloud else "edge",
             cfg.task.name, cfg.route_name, f"{cfg.rate:g} req/s" if cfg.rate else _steps(cfg.schedule or []))
    result = asyncio.run(_run(cfg, queries, offsets))
    report = {
        "target": cfg.target, "mode": "cloud" if cfg.cloud else "edge", "task": cfg.task.name, "route": cfg.route_name,
        "label_set_version": cfg.task.label_set_version, "oos_label": cfg.task.oos_label, "data": data,
        "load": {"rate": cfg.rate, "schedule": [s.model_dump() for s in cfg.schedule or []], "seed": cfg.seed,
                 "timeout_s": cfg.timeout},
        **result,
    }
    if not report["answered"]:  # an empty histogram reads 0 ms: no answer has no latency
        report.update({k: None for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms")})
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = plot_load(report, out)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


async def _run(cfg: LoadConfig, queries: list[Example], offsets: list[float]) -> dict[str, Any]:
    target = cloud_target if cfg.cloud else edge_target
    async with target(cfg.target, cfg.timeout, cfg.ca, cfg.cert, cfg.key) as infer:
        return await measure(infer, cfg.route_name, queries, offsets, cfg.task.oos_label, "load", cfg.warmup)


def _steps(schedule: Sequence[Step]) -> str:
    return ", then ".join(f"{s.rate:g} req/s for {s.duration:g} s" for s in schedule)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(r: dict[str, Any]) -> str:
    """The run at a glance."""
    data = r["data"]
    lines = [
        f"{r['sent']} requests to {r['target']} ({r['mode']}), task {r['task']} as {r['route']!r}; "
        f"{r['throughput_rps']:.1f} answers/s",
        f"answered {r['answered']}  failed {r['failed']}  errors {r['errors'] or 'none'}",
        f"latency from scheduled send: p50 {_ms(r['p50_ms'])} ms  p99 {_ms(r['p99_ms'])} ms  "
        f"(send lateness p99 {r['send_lateness_p99_ms']:.2f} ms)",
        f"accuracy {_pct(r['accuracy'])}  escalated {_pct(r['escalation_rate'])}  fallback {_pct(r['fallback_rate'])}",
        f"out of scope ({r['oos_label']}): {data['out_of_scope_rows']} of {data['rows']} data rows "
        f"({data['unknown_label_rows']} with labels outside the task); open recall {_pct(r['open_recall'])} over "
        f"{r['open_rows']} answered; known accuracy {_pct(r['known_accuracy'])}; "
        f"{r['out_of_scope_answers']} answers out of scope",
        "",
        f"{'path':10} {'share':>7} {'accuracy':>9} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for path, stats in r["by_path"].items():
        latency = r["paths"][path]
        lines.append(f"{path:10} {stats['share']:7.1%} {stats['accuracy']:9.1%} {latency['p50_ms']:8.2f} "
                     f"{latency['p99_ms']:8.2f}")
    return "\n".join(lines)
