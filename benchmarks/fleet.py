"""Fleet mode: hundreds of simulated edges in one process, escalating to one cloud.

Every edge is a real `EdgeService` with its own policy and its own gRPC channel to the
cloud, as separate devices have; they share one student session and micro-batcher, so
a laptop can play a fleet and the cloud sees a fleet's connections and load.
"""

from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry

from benchmarks.edge_load import Infer
from edge.batcher import MicroBatcher
from edge.cloud_client import GrpcEscalator
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.policy import Policy
from edge.service import EdgeService, TaskRuntime
from edge.student import SessionOptions, Student


class Fleet:
    def __init__(self, edge_cfg: dict[str, Any], edges: int) -> None:
        self._cfg = EdgeConfig.model_validate(edge_cfg)
        self._count = edges
        self._escalators: list[GrpcEscalator] = []
        self._batchers: list[MicroBatcher] = []
        self.edges: list[Infer] = []

    async def __aenter__(self) -> "Fleet":
        cfg = self._cfg
        students = {task: Student(path, SessionOptions(cfg.intra_op_threads, cfg.allow_spinning)) for task, path in cfg.tasks.items()}
        self._batchers = [MicroBatcher(s.predict, cfg.max_batch) for s in students.values()]
        for batcher in self._batchers:
            batcher.start()
        # One registry for the fleet: the edges' metrics add up, like a fleet-wide scrape.
        metrics = EdgeMetrics(CollectorRegistry())
        for _ in range(self._count):
            escalator = GrpcEscalator(cfg.cloud)
            self._escalators.append(escalator)
            runtimes = {task: TaskRuntime(s, b, Policy(cfg.policy)) for (task, s), b in zip(students.items(), self._batchers)}
            self.edges.append(EdgeService(runtimes, escalator, metrics, cfg.max_text_bytes).infer)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for escalator in self._escalators:
            await escalator.close()
        for batcher in self._batchers:
            await batcher.close()
