"""`tandem bench chaos --out DIR`: the real system (the cloud, and edge daemons with outboxes
and updaters on) under open-loop traffic while a fault schedule kills, cuts, fills, corrupts
and overloads its parts; then everything the clients were answered is reconciled with the
feedback store, and every process it started must be gone. Writes DIR/chaos.json."""

import asyncio
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.chaos import faults as fx
from benchmarks.chaos.config import ChaosConfig
from benchmarks.chaos.faults import Chaos, Fault
from benchmarks.chaos.figures import figures
from benchmarks.chaos.parts import RssSampler, small_disk
from benchmarks.chaos.probe import CloudProbe
from benchmarks.chaos.rig import Edge, Rig
from benchmarks.chaos.traffic import EdgeClients, Traffic, live_round_robin, shuffled
from benchmarks.netfault import running_netfault
from benchmarks.system import cloud_config, cloud_files
from cloud.feedback.store import FeedbackStore

log = logging.getLogger(__name__)

EXPERT = "banking77-classifier"
DISK_EDGE, DOOR_EDGE = "edge-1", "edge-2"
DOOR_MAX_QUEUE = 64


def run_chaos(cfg: ChaosConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tandem-chaos-") as tmp:
        result = asyncio.run(_run(cfg, Path(tmp)))
    (out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


async def _run(cfg: ChaosConfig, work: Path) -> dict[str, Any]:
    from cloud.prepare import ensure_trained, local_train_config

    train_cfg = local_train_config(None)
    for kind, given in (("teacher", cfg.teacher), ("student", cfg.student)):
        if given is None:
            await asyncio.to_thread(ensure_trained, train_cfg, kind)
    task = train_cfg.task
    settings = cloud_config({EXPERT}, feedback_uri=str(work / "feedback"), registry_dir=str(work / "registry"),
                            # Fallbacks of the overload would pass the shipped daily quota, which is not under test.
                            fleet={"device_quota_per_day": 10_000_000})
    if cfg.teacher is not None:
        settings["experts"][0]["model"] = str(cfg.teacher)
    (work / "cloud").mkdir()
    rig = Rig(cloud_files(settings, work / "cloud"), work, task.name, cfg.student or train_cfg.model_dir("student"))
    rig.publish()  # the version the edges start with
    sampler = RssSampler(rig.roles)
    started = time.monotonic()
    with small_disk(work / DISK_EDGE / "outbox", cfg.disk_mb) as disk, running_netfault(rig.files.target) as (port, net):
        edges = _edges(cfg, rig, f"127.0.0.1:{port}")
        clients = EdgeClients({e.name: e.port for e in edges})
        traffic = Traffic(clients, task.name, shuffled([e.text for e in task.load("test")], cfg.seed), cfg.seed)
        probe = CloudProbe(rig.files.link("chaos-probe"), task.name, task.label_names()[0])
        try:
            log.info("starting the cloud and %d edge daemons", len(edges))
            await asyncio.to_thread(rig.cloud.start)
            for edge in edges:
                await rig.start_edge(edge)
            sampler.start()
            probe.start()
            chaos = Chaos(rig, traffic, clients, probe, net, random.Random(cfg.seed))
            timeline = await _schedule(cfg, chaos, disk)
            await _drain(rig, cfg.drain_timeout_s)
            final = {"dead": sum(e.gauge("tandem_edge_feedback_dead_records") for e in edges),
                     "outbox": sum(e.gauge("tandem_edge_outbox_records") for e in edges)}
            log.info("load shedding at %s's own door: %d requests at once", DOOR_EDGE, cfg.door_burst)
            door = await traffic.burst(DOOR_EDGE, cfg.door_burst)
        finally:
            await probe.stop()
            await clients.close()
            rig.stop_edges()
            rig.cloud.stop()
            sampler.stop()
    store = FeedbackStore(str(rig.feedback_root))
    return figures(cfg, timeline, traffic.outcomes, door, rig, sampler, chaos.destroyed, final,
                   compact=lambda: store.compact(task.name), started=started)


# The cascade edges' policy: the threshold the shipped edge config pinned before per-student thresholds.
CASCADE_POLICY = {"mode": "threshold", "threshold": 0.7}


def _edges(cfg: ChaosConfig, rig: Rig, target: str) -> list[Edge]:
    """The cloud-only edges (they take the overload; the first is killed mid-delivery, and
    delivers in small batches, so that its backlog takes several), then the cascade edges: one
    with its outbox on the small disk, one with a short queue for the door test."""
    edges = [rig.add_edge(name, target, rig.work / name / "outbox", policy={"mode": "cloud_only"},
                          feedback={"batch_size": 20})
             for name in _cloud_only(cfg)]
    for i in range(1, cfg.edges + 1):
        name = f"edge-{i}"
        fields = {"max_queue": DOOR_MAX_QUEUE} if name == DOOR_EDGE else {}
        # A pinned threshold: the faults need escalations to strike, and a student's fitted one may
        # keep nearly everything local (a briefly trained student against a weak teacher does).
        edges.append(rig.add_edge(name, target, rig.work / name / "outbox", policy=CASCADE_POLICY, **fields))
    return edges


async def _schedule(cfg: ChaosConfig, c: Chaos, disk: bool) -> dict[str, Any]:
    """Steady traffic with the faults one after another; returns the timeline."""
    edges = c.rig.edges
    cloud_only = _cloud_only(cfg)
    log.info("the cloud's capacity: %d calls in flight for %.0f s through %s", cfg.capacity_concurrency,
             cfg.capacity_s, cloud_only[0])
    capacity = await c.traffic.capacity(cloud_only[0], cfg.capacity_concurrency, cfg.capacity_s)
    log.info("capacity %.1f escalations/s; steady stream: %d+ requests at %g req/s", capacity, cfg.requests,
             cfg.rate_rps)
    done = asyncio.Event()
    start = time.monotonic()
    steady = asyncio.create_task(c.traffic.stream(
        "steady", cfg.rate_rps, live_round_robin(c.clients, list(edges)), lambda i: i < cfg.requests or not done.is_set()))
    await asyncio.sleep(cfg.steady_s)
    steady_window = (start + 5.0, time.monotonic())
    steps = [*(fx.replica_kill for _ in range(cfg.replica_kills)),
             lambda c: fx.network_cut(c, cfg.cut_s),
             lambda c: fx.edge_kill_during_delivery(c, edges[cloud_only[0]], cfg.cut_s, cfg.delay_ms, cfg.jitter_ms),
             lambda c: fx.network_latency(c, cfg.latency_s, cfg.delay_ms, cfg.jitter_ms),
             *([lambda c: fx.disk_full(c, edges[DISK_EDGE], cfg.disk_full_s)] if disk else []),
             fx.corrupt_parquet,
             lambda c: fx.edge_kill_during_swap(c, edges[f"edge-{cfg.edges}"]),
             lambda c: fx.overload(c, [edges[n] for n in cloud_only], cfg.overload_factor * capacity, cfg.overload_s),
             fx.cloud_kill]
    timeline: list[Fault] = []
    for step in steps:
        fault = await step(c)
        log.info("%s: back after %s, recovered %s later", fault.name, _s(fault.back, fault.start),
                 _s(fault.recovered, fault.back))
        timeline.append(fault)
        await asyncio.sleep(cfg.settle_s)
    done.set()
    sent = await steady
    await c.traffic.drain()
    return {"capacity_rps": capacity, "steady_window": steady_window, "faults": timeline, "steady_sent": sent,
            "end": time.monotonic(), "disk_fault": disk}


async def _drain(rig: Rig, timeout_s: float) -> None:
    """Waits until every edge's outbox is empty: what they accepted has reached the store."""
    log.info("waiting for the edges' outboxes to empty")
    if not await fx.until(lambda: all(e.gauge("tandem_edge_outbox_records") == 0 for e in rig.edges.values()),
                          timeout_s):
        log.warning("outboxes still hold records after %.0f s", timeout_s)


def _cloud_only(cfg: ChaosConfig) -> list[str]:
    return [f"cloud-{i}" for i in range(1, cfg.cloud_only_edges + 1)]


def _s(t: float | None, since: float | None) -> str:
    return "never" if t is None or since is None else f"{t - since:.1f} s"
