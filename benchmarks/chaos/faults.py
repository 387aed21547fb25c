"""The fault schedule's faults. Each injects one failure into the running rig, removes it,
and waits until the broken part answers again (`back`) and the traffic through it is served
as before (`recovered`); each returns a `Fault` with what it saw."""

import asyncio
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.chaos.ledger import OWED_KIND, part_files, request_ids
from benchmarks.chaos.parts import alive, fill_disk
from benchmarks.chaos.probe import CloudProbe
from benchmarks.chaos.rig import Edge, Rig
from benchmarks.chaos.traffic import EdgeClients, Outcome, Traffic
from benchmarks.netfault import NetFault

log = logging.getLogger(__name__)

RECOVER_TIMEOUT_S = 180.0
POLL_S = 0.05


@dataclass
class Fault:
    name: str
    start: float
    end: float = 0.0  # the failure removed: the part restarted, the network healed, the disk freed
    back: float | None = None  # the broken part answering again
    recovered: float | None = None  # the traffic through it served as before
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chaos:
    """What the faults act on."""

    rig: Rig
    traffic: Traffic
    clients: EdgeClients
    probe: CloudProbe
    net: NetFault
    rng: random.Random
    destroyed: set[str] = field(default_factory=set)  # request ids in files corrupted on purpose
    kill_order: list[str] = field(default_factory=list)  # the applications whose replicas are next killed

    async def first(self, found: Callable[[Outcome], bool], since: float) -> float | None:
        """When the first request scheduled at or after `since` that `found` accepts was
        answered; None if none within RECOVER_TIMEOUT_S."""
        deadline = time.monotonic() + RECOVER_TIMEOUT_S
        while time.monotonic() < deadline:
            hits = [o.sent + o.latency_s for o in self.traffic.outcomes if o.sent >= since and found(o)]
            if hits:
                return min(hits)
            await asyncio.sleep(0.2)
        return None

    async def cloud_answering(self, since: float) -> float | None:
        return await self.first(lambda o: o.source == "CLOUD", since)

    async def quiesce(self, edge: Edge) -> None:
        """Takes `edge` out of the traffic and waits for its calls in flight to end, so that a
        kill fails no request: a dead daemon's traffic goes to the others."""
        self.clients.down.add(edge.name)
        while self.traffic.in_flight[edge.name]:
            await asyncio.sleep(POLL_S)

    async def restart(self, edge: Edge, f: Fault) -> None:
        f.end = f.back = await self.rig.start_edge(edge)
        self.clients.down.discard(edge.name)
        f.recovered = await self.first(lambda o: o.edge == edge.name and o.answered, f.back)


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(POLL_S)
    return False


async def replica_kill(c: Chaos) -> Fault:
    """SIGKILL of a random Serve replica, as Serve's own chaos test does; Serve replaces it.
    The applications take turns in a random order, so that two kills hit both an expert and
    the fleet."""
    replicas = c.rig.replicas()
    if not c.kill_order:
        c.kill_order = c.rng.sample(sorted(replicas), len(replicas))
    app = c.kill_order.pop()
    proc = c.rng.choice(replicas[app])
    subtree = proc.children(recursive=True)
    f = Fault(f"replica_kill:{app}", time.monotonic())
    os.kill(proc.pid, signal.SIGKILL)
    f.end = time.monotonic()
    f.back = await c.probe.up_after(f.end, RECOVER_TIMEOUT_S)
    f.recovered = await c.cloud_answering(f.back)
    f.details["orphans"] = alive(subtree)
    return f


async def network_cut(c: Chaos, seconds: float) -> Fault:
    """No packet between the edges and the cloud for `seconds`: connections hang, not close."""
    f = Fault("network_cut", time.monotonic())
    await asyncio.to_thread(c.net.cut)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(c.net.heal)
    f.end = f.back = time.monotonic()
    f.recovered = await c.cloud_answering(f.end)
    return f


async def network_latency(c: Chaos, seconds: float, delay_ms: float, jitter_ms: float) -> Fault:
    f = Fault("network_latency", time.monotonic(), details={"delay_ms": delay_ms, "jitter_ms": jitter_ms})
    await asyncio.to_thread(c.net.delay, delay_ms, jitter_ms)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(c.net.heal)
    f.end = f.back = time.monotonic()
    f.recovered = await c.cloud_answering(f.end)
    return f


async def edge_kill_during_delivery(c: Chaos, edge: Edge, backlog_s: float, delay_ms: float,
                                    jitter_ms: float) -> Fault:
    """Builds a backlog in `edge`'s outbox (the network cut for `backlog_s`), lets it through
    slowly (`delay_ms` on every chunk), and SIGKILLs the daemon just after the cloud
    acknowledged its first batch, while the next batches are on their way; then heals the
    network and restarts the daemon."""
    await asyncio.to_thread(c.net.cut)
    await asyncio.sleep(backlog_s)
    await c.quiesce(edge)
    delivered = edge.counter("tandem_edge_feedback_delivered_total")
    depth = edge.gauge("tandem_edge_outbox_records")
    f = Fault("edge_kill_during_delivery", time.monotonic(), details={"edge": edge.name, "outbox_at_heal": depth})
    await asyncio.to_thread(c.net.delay, delay_ms, jitter_ms)
    f.details["mid_delivery"] = await until(
        lambda: edge.counter("tandem_edge_feedback_delivered_total") > delivered, RECOVER_TIMEOUT_S)
    f.details["outbox_at_kill"] = edge.gauge("tandem_edge_outbox_records")
    c.rig.kill_edge(edge)
    await asyncio.to_thread(c.net.heal)
    await c.restart(edge, f)
    return f


async def edge_kill_during_swap(c: Chaos, edge: Edge) -> Fault:
    """Promotes a new version, has `edge` poll at once (SIGHUP), and SIGKILLs it as soon as
    the version is installed, before it serves; then restarts it."""
    await c.quiesce(edge)
    version = await asyncio.to_thread(c.rig.publish)
    installed = edge.models_dir / c.rig.task / version
    f = Fault("edge_kill_during_swap", time.monotonic(), details={"edge": edge.name, "version": version})
    edge.part.signal(signal.SIGHUP)
    f.details["killed_installed"] = await until(installed.exists, RECOVER_TIMEOUT_S)
    c.rig.kill_edge(edge)
    await c.restart(edge, f)
    serving = await c.first(lambda o: o.edge == edge.name and o.model_version == version, f.end)
    f.details["serves_new_version_s"] = None if serving is None else serving - f.end
    return f


async def disk_full(c: Chaos, edge: Edge, seconds: float) -> Fault:
    """Fills the filesystem under `edge`'s outbox for `seconds`, then frees it."""
    def refused() -> dict[str, float]:
        return {kind: edge.counter("tandem_edge_feedback_refused_total", kind=kind) for kind in OWED_KIND.values()}

    before = refused()
    f = Fault("disk_full", time.monotonic(), details={"edge": edge.name})
    filler = await asyncio.to_thread(fill_disk, edge.outbox_dir)
    await asyncio.sleep(seconds)
    filler.unlink()
    f.end = f.back = time.monotonic()
    f.details["refused_by_kind"] = {kind: n - before[kind] for kind, n in refused().items()}
    recorded = edge.counter("tandem_edge_feedback_recorded_total")
    if await until(lambda: edge.counter("tandem_edge_feedback_recorded_total") > recorded, RECOVER_TIMEOUT_S):
        f.recovered = time.monotonic()
    return f


async def corrupt_parquet(c: Chaos) -> Fault:
    """Overwrites the store's biggest Parquet file with garbage and restarts the fleet
    replica, whose id index reloads from the files at start."""
    target = max(part_files(c.rig.feedback_root), key=lambda p: p.stat().st_size)
    c.destroyed |= request_ids(target)
    f = Fault("corrupt_parquet", time.monotonic(), details={"file": target.name, "records": len(c.destroyed)})
    target.write_bytes(os.urandom(target.stat().st_size))
    fleet = c.rig.replicas()["fleet"][0]
    os.kill(fleet.pid, signal.SIGKILL)
    f.end = time.monotonic()
    f.back = await c.probe.up_after(f.end, RECOVER_TIMEOUT_S, expert=False)
    delivered = sum(e.counter("tandem_edge_feedback_delivered_total") for e in c.rig.edges.values())
    if await until(lambda: sum(e.counter("tandem_edge_feedback_delivered_total")
                               for e in c.rig.edges.values()) > delivered, RECOVER_TIMEOUT_S):
        f.recovered = time.monotonic()
    f.details["quarantined"] = len(list((c.rig.feedback_root / "_quarantine").rglob("*.parquet")))
    return f


async def overload(c: Chaos, edges: list[Edge], rate_rps: float, seconds: float) -> Fault:
    """`rate_rps` (a multiple of the cloud's measured capacity) through the cloud-only `edges`
    in turn for `seconds`, beside the steady stream."""
    names = [e.name for e in edges]
    f = Fault("overload", time.monotonic(), details={"edges": names, "offered_rps": rate_rps})
    stop = f.start + seconds
    sent = await c.traffic.stream("overload", rate_rps, lambda i: names[i % len(names)],
                                  lambda i: time.monotonic() < stop)
    f.end = f.back = time.monotonic()
    f.details["sent"] = sent
    f.recovered = await c.first(lambda o: o.edge in names and o.source == "CLOUD", f.end)
    return f


async def cloud_kill(c: Chaos, grace_s: float = 10.0) -> Fault:
    """SIGKILL of the whole cloud (its process group: Ray's head, Serve, vLLM, the proxy),
    then a restart from the same files."""
    f = Fault("cloud_kill", time.monotonic())
    subtree = c.rig.cloud.kill()
    await asyncio.sleep(grace_s)
    f.details["orphans"] = alive(subtree)
    f.end = time.monotonic()
    await asyncio.to_thread(c.rig.cloud.start)
    f.back = await c.probe.up_after(time.monotonic(), RECOVER_TIMEOUT_S)
    f.recovered = await c.cloud_answering(f.back)
    return f

