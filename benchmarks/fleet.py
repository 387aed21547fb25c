"""Fleet mode: hundreds of simulated edges in one process, escalating to one cloud.

Every edge is a real `EdgeService` with its own policy and its own gRPC channel to the
cloud, as separate devices have; they share one student session and micro-batcher, so
one machine can play a fleet and the cloud sees a fleet's connections and load. The
simulated edges record no feedback (a real device's outbox is its own disk).
"""

import logging
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.edge_load import Infer
from edge.cloud_client import CloudClient
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.runtime import Serving
from edge.service import build_service
from edge.student import SessionOptions, Student


class Fleet:
    def __init__(self, edge_cfg: dict[str, Any], edges: int) -> None:
        self._cfg = EdgeConfig.model_validate(edge_cfg)
        self._count = edges
        self._clients: list[CloudClient] = []
        self._serving: dict[str, Serving] = {}
        self.edges: list[Infer] = []

    async def __aenter__(self) -> "Fleet":
        # A line per fallback is a daemon's log; here the report counts them, by path.
        logging.getLogger("edge").setLevel(logging.ERROR)
        cfg = self._cfg
        options = SessionOptions(cfg.intra_op_threads, cfg.allow_spinning)
        self._serving = {task: Serving.start(Student.load(path, options), cfg.max_batch, cfg.max_queue) for task, path in cfg.tasks.items()}
        # One registry for the fleet: the edges' metrics add up, like a fleet-wide scrape.
        metrics = EdgeMetrics(CollectorRegistry())
        for i in range(self._count):
            client = CloudClient(cfg.cloud)
            self._clients.append(client)
            service = build_service(cfg, self._serving, metrics, client, device_id=f"{cfg.device_id}-{i}")
            self.edges.append(service.infer)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for client in self._clients:
            await client.close()
        for serving in self._serving.values():
            await serving.batcher.close()
