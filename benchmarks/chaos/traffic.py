"""The chaos run's traffic: open-loop Poisson streams through the live edge daemons, every
answer kept as an `Outcome` (latency from the scheduled send time), a closed-loop capacity
measurement, and a burst at one edge's door."""

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from tandem.v1 import edge_pb2, edge_pb2_grpc

# A call the daemon has not answered by then counts as failed: an edge answers within its
# cloud deadline (2 s) plus local inference, even when the cloud is gone.
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    stream: str
    request_id: str
    edge: str
    sent: float  # scheduled send time, time.monotonic()
    latency_s: float
    code: str  # "OK", or the gRPC status
    source: str  # CLOUD, EDGE or EDGE_FALLBACK when answered
    reason: str
    model_version: str

    @property
    def answered(self) -> bool:
        return self.code == "OK"


class EdgeClients:
    """A channel to each edge daemon's fixed port, and which daemons are up."""

    def __init__(self, ports: dict[str, int]) -> None:
        self._channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()}
        self.stubs = {name: edge_pb2_grpc.EdgeStub(ch) for name, ch in self._channels.items()}
        self.down: set[str] = set()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class Traffic:
    def __init__(self, clients: EdgeClients, task: str, texts: Sequence[str], seed: int) -> None:
        self._clients = clients
        self._task = task
        self._texts = texts
        self._rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self._calls: set[asyncio.Task[None]] = set()
        self.in_flight: Counter[str] = Counter()  # calls waiting for an answer, by edge

    async def stream(self, name: str, rate_rps: float, edges: Callable[[int], str | None],
                     more: Callable[[int], bool]) -> int:
        """Poisson arrivals at `rate_rps` while `more(i)`; request i goes to edge `edges(i)`
        (None: skipped, no edge up). Returns the number sent; answers keep arriving after."""
        next_at = time.monotonic()
        i = 0
        while more(i):
            next_at += self._rng.expovariate(rate_rps)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            edge = edges(i)
            if edge is not None:
                self._spawn(self.call(name, f"{name[0]}{i}", edge, self._texts[i % len(self._texts)], next_at))
            i += 1
        return i

    async def call(self, stream: str, request_id: str, edge: str, text: str, sent: float) -> None:
        request = edge_pb2.InferRequest(task=self._task, text=text.encode(), request_id=request_id)
        self.in_flight[edge] += 1
        try:
            r = await self._clients.stubs[edge].Infer(request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.outcomes.append(Outcome(stream, request_id, edge, sent, time.monotonic() - sent, exc.code().name,
                                         "", exc.details() or "", ""))
            return
        finally:
            self.in_flight[edge] -= 1
        self.outcomes.append(Outcome(stream, request_id, edge, sent, time.monotonic() - sent, "OK",
                                     edge_pb2.Source.Name(r.source), r.reason, r.model_version))

    async def drain(self) -> None:
        """Waits for every call still in flight (each ends within CALL_TIMEOUT_S)."""
        await asyncio.gather(*self._calls)

    def _spawn(self, call: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def capacity(self, edge: str, concurrency: int, duration_s: float) -> float:
        """Cloud answers per second through `edge` (a cloud-only daemon) with `concurrency`
        calls always in flight: the cloud's capacity, measured through the path edges use."""
        stop = time.monotonic() + duration_s
        answered = 0

        async def worker(w: int) -> None:
            nonlocal answered
            i = 0
            while time.monotonic() < stop:
                request = edge_pb2.InferRequest(task=self._task, text=self._texts[(w * 7919 + i) % len(self._texts)].encode(),
                                                request_id=f"c{w}-{i}")
                r = await self._clients.stubs[edge].Infer(request, timeout=CALL_TIMEOUT_S)
                answered += r.source == edge_pb2.CLOUD
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return answered / (time.monotonic() - started)

    async def burst(self, edge: str, count: int) -> list[Outcome]:
        """`count` requests at `edge` at once: its own door's load shedding."""
        sent = time.monotonic()
        before = len(self.outcomes)
        await asyncio.gather(*(self.call("door", f"d{i}", edge, self._texts[i % len(self._texts)], sent)
                               for i in range(count)))
        burst = self.outcomes[before:]
        del self.outcomes[before:]
        return burst


def shuffled(texts: Sequence[str], seed: int) -> list[str]:
    order = list(texts)
    random.Random(seed).shuffle(order)
    return order


def live_round_robin(clients: EdgeClients, names: Sequence[str]) -> Callable[[int], str | None]:
    """Request i to the i-th edge of `names` that is up: a dead daemon's share goes to the
    others, as a load balancer in front of a site's devices would send it."""
    def pick(i: int) -> str | None:
        up = [n for n in names if n not in clients.down]
        return up[i % len(up)] if up else None
    return pick


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`; None for none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
