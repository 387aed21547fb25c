"""Replaying labelled queries through edges in open loop: latency, accuracy and errors
per path (local, escalated, fallback).

An edge is anything with the `Edge.Infer` signature: a stub on a daemon, or a simulated
edge in fleet mode. Requests are spread over the edges round-robin.
"""

from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.latency import LatencyRecorder
from benchmarks.loadgen import open_loop
from tandem.tasks import Example
from tandem.v1 import edge_pb2

Infer = Callable[[edge_pb2.InferRequest], Awaitable[edge_pb2.InferResponse]]

PATHS = {edge_pb2.EDGE: "local", edge_pb2.CLOUD: "escalated", edge_pb2.EDGE_FALLBACK: "fallback"}


@dataclass
class Accuracy:
    """Answers and correct answers by path."""

    answered: Counter[str] = field(default_factory=Counter)
    correct: Counter[str] = field(default_factory=Counter)

    def record(self, path: str, ok: bool) -> None:
        self.answered[path] += 1
        self.correct[path] += ok

    def summary(self) -> dict[str, Any]:
        total = sum(self.answered.values())
        sent = self.answered["escalated"] + self.answered["fallback"]
        return {
            "answered": total,
            "accuracy": sum(self.correct.values()) / total if total else None,
            # Share the policy sent to the cloud, whether or not the cloud answered.
            "escalation_rate": sent / total if total else None,
            "fallback_rate": self.answered["fallback"] / total if total else None,
            "by_path": {
                path: {"share": n / total, "accuracy": self.correct[path] / n}
                for path, n in sorted(self.answered.items())
            },
        }


async def replay(
    edges: Sequence[Infer], task: str, examples: Sequence[Example], offsets: Sequence[float], run: str
) -> dict[str, Any]:
    """Sends `examples[i % len]` at each offset; returns the load summary with accuracy."""
    accuracy = Accuracy()
    requests = [edge_pb2.InferRequest(task=task, text=e.text.encode()) for e in examples]

    async def call(i: int) -> str:
        request = edge_pb2.InferRequest()
        request.CopyFrom(requests[i % len(requests)])
        request.request_id = f"{run}-{i}"
        response = await edges[i % len(edges)](request)
        path = PATHS[response.source]
        accuracy.record(path, response.label == examples[i % len(examples)].label)
        return path

    result = await open_loop(call, offsets)
    summary = {**result.summary(), **accuracy.summary(), "cdf": {p: _cdf(r) for p, r in result.paths.items()}}
    # Errors count as wrong here: under overload, failed requests must not flatter accuracy.
    summary["accuracy_offered"] = sum(accuracy.correct.values()) / len(offsets) if len(offsets) else None
    return summary


def _cdf(recorder: LatencyRecorder, points: int = 120) -> list[tuple[float, float]]:
    """(latency ms, percentile) pairs, denser in the tail where the plot is read."""
    percentiles = [100 * (1 - 10 ** (-4 * k / points)) for k in range(points + 1)]
    return [(recorder.percentile_ms(p), p) for p in percentiles]
