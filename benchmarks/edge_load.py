"""Replaying labelled queries through edges in open loop: latency, accuracy and errors
per path (local, escalated, fallback), out-of-scope metrics, and the answers over time.

An edge is anything with the `Edge.Infer` signature: a stub on a daemon, a cloud expert
seen as an edge in cloud-only mode (`benchmarks.load`), or a simulated edge in fleet mode.
Requests are spread over the edges round-robin.

Out of scope: an example whose truth is `oos_label` is an open row (it fits no intent);
`open_recall` is the share of answered open rows answered with that label, and
`known_accuracy` the accuracy on the other answered rows, an out-of-scope answer counting
as wrong. Both are None where no such row was answered.
"""

import time
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


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@dataclass
class Accuracy:
    """Answers and correct answers by path, and on open (out-of-scope) and known rows."""

    oos_label: str | None = None
    answered: Counter[str] = field(default_factory=Counter)
    correct: Counter[str] = field(default_factory=Counter)
    # Answers flagged `out_of_scope` by the edge or the expert, by path.
    out_of_scope: Counter[str] = field(default_factory=Counter)
    open_rows: int = 0
    open_hits: int = 0
    known_rows: int = 0
    known_correct: int = 0

    def record(self, path: str, truth: str, response: edge_pb2.InferResponse) -> None:
        ok = response.label == truth
        self.answered[path] += 1
        self.correct[path] += ok
        self.out_of_scope[path] += response.out_of_scope
        if truth == self.oos_label:
            self.open_rows += 1
            self.open_hits += ok
        else:
            self.known_rows += 1
            self.known_correct += ok

    def summary(self) -> dict[str, Any]:
        total = sum(self.answered.values())
        sent = self.answered["escalated"] + self.answered["fallback"]
        return {
            "answered": total,
            "accuracy": _share(sum(self.correct.values()), total),
            # Share the policy sent to the cloud, whether or not the cloud answered.
            "escalation_rate": _share(sent, total),
            "fallback_rate": _share(self.answered["fallback"], total),
            "out_of_scope_answers": sum(self.out_of_scope.values()),
            "open_rows": self.open_rows,
            "open_recall": _share(self.open_hits, self.open_rows),
            "known_accuracy": _share(self.known_correct, self.known_rows),
            "by_path": {
                path: {"share": n / total, "accuracy": self.correct[path] / n, "answered": n,
                       "out_of_scope_answers": self.out_of_scope[path]}
                for path, n in sorted(self.answered.items())
            },
        }


async def replay(
    edges: Sequence[Infer], task: str, examples: Sequence[Example], offsets: Sequence[float], run: str,
    oos_label: str | None = None,
) -> dict[str, Any]:
    """Sends `examples[i % len]` at each offset; returns the load summary with accuracy.
    Each example's label is its truth; `oos_label` marks the open rows."""
    accuracy = Accuracy(oos_label)
    requests = [edge_pb2.InferRequest(task=task, text=e.text.encode()) for e in examples]
    answered_at: list[float] = []
    failed_at: list[float] = []

    async def call(i: int) -> str:
        request = edge_pb2.InferRequest()
        request.CopyFrom(requests[i % len(requests)])
        request.request_id = f"{run}-{i}"
        try:
            response = await edges[i % len(edges)](request)
        except Exception:
            failed_at.append(time.perf_counter())
            raise
        answered_at.append(time.perf_counter())
        path = PATHS[response.source]
        accuracy.record(path, examples[i % len(examples)].label, response)
        return path

    result = await open_loop(call, offsets)
    summary = {**result.summary(), **accuracy.summary(), "cdf": {p: _cdf(r) for p, r in result.paths.items()}}
    summary["sent"] = result.offered
    summary["failed"] = sum(result.errors.values())
    # Errors count as wrong here: under overload, failed requests must not flatter accuracy.
    summary["accuracy_offered"] = sum(accuracy.correct.values()) / len(offsets) if len(offsets) else None
    summary["timeline"] = timeline(offsets, [t - result.started for t in answered_at],
                                   [t - result.started for t in failed_at])
    return summary


def timeline(offered: Sequence[float], answered: Sequence[float], failed: Sequence[float],
             bin_s: float = 1.0) -> dict[str, Any]:
    """Requests per `bin_s` from the run's start: scheduled, answered and failed (by the time
    the answer or the failure came back)."""
    bins = int(max([*offered, *answered, *failed, 0.0]) / bin_s) + 1

    def counts(times: Sequence[float]) -> list[int]:
        out = [0] * bins
        for t in times:
            out[int(t / bin_s)] += 1
        return out

    return {"bin_s": bin_s, "offered": counts(offered), "answered": counts(answered), "failed": counts(failed)}


def _cdf(recorder: LatencyRecorder, points: int = 120) -> list[tuple[float, float]]:
    """(latency ms, percentile) pairs, denser in the tail where the plot is read."""
    percentiles = [100 * (1 - 10 ** (-4 * k / points)) for k in range(points + 1)]
    return [(recorder.percentile_ms(p), p) for p in percentiles]
