"""Resource readings during a run: edge CPU and RSS (psutil), cloud queue depth (the
Ray metrics endpoint that Prometheus scrapes)."""

import threading
import time
import urllib.request
from types import TracebackType
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

# Requests waiting in Serve's routers, and requests running in replicas.
QUEUED = "ray_serve_deployment_queued_queries"
RUNNING = "ray_serve_replica_processing_queries"


def cloud_queue(metrics_url: str) -> dict[str, float]:
    """Summed over deployments: queued and running requests, as last exported by Ray."""
    with urllib.request.urlopen(metrics_url, timeout=2) as r:
        text = r.read().decode()
    totals = {QUEUED: 0.0, RUNNING: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return {"queued": totals[QUEUED], "running": totals[RUNNING]}


class Monitor:
    """Samples in a thread while the `with` block runs; `summary()` afterwards.

    CPU is the processes' CPU seconds over wall seconds (1.0 = one core busy). The cloud
    queue is as fresh as Ray's metrics export (seconds), so its maximum is a lower bound.
    """

    def __init__(self, pids: list[int], metrics_url: str | None = None, interval_s: float = 0.5) -> None:
        self._procs = [psutil.Process(pid) for pid in pids]
        self._metrics_url = metrics_url
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._rss_max = 0.0
        self._queue_max = {"queued": 0.0, "running": 0.0}
        self._queue_error: str | None = None
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self._cpu_cores = 0.0

    def __enter__(self) -> "Monitor":
        self._cpu0, self._wall0 = self._cpu_seconds(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._cpu_cores = (self._cpu_seconds() - self._cpu0) / (time.perf_counter() - self._wall0)

    def _cpu_seconds(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self._procs)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._rss_max = max(self._rss_max, sum(p.memory_info().rss for p in self._procs) / 2**20)
            if self._metrics_url is not None:
                self._sample_queue(self._metrics_url)

    def _sample_queue(self, url: str) -> None:
        try:
            queue = cloud_queue(url)
        except OSError as exc:  # reported in the summary: the run goes on without it
            self._queue_error = f"{type(exc).__name__}: {exc}"
            return
        for key, value in queue.items():
            self._queue_max[key] = max(self._queue_max[key], value)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"edge_cpu_cores": self._cpu_cores, "edge_rss_mb_max": self._rss_max}
        if self._metrics_url is not None:
            out["cloud_queued_max"] = self._queue_max["queued"]
            out["cloud_running_max"] = self._queue_max["running"]
            out["cloud_metrics_error"] = self._queue_error
        return out
