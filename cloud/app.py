"""The Ray Serve applications: one per expert, each implementing `tandem.v1.Cloud.Escalate`
directly on its vLLM engine, and the registry (feedback in, students out).

Serve's gRPC proxy routes by the `application` metadata, so the proxy is the router and
each escalation takes one Serve hop (an ingress deployment in front of the experts cost a
second hop: 11.6 ms of overhead against a 5.5 ms Serve echo, measured by `tandem bench
cloud`). Edges map each task to its expert's application.

Each expert records the escalations it answers as feedback, sent in the background to the
registry application's deployment through a DeploymentHandle (one Serve hop, off the
request path).

`tandem cloud serve` and `serve run cloud/serve_config.yaml` build them with the same code.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from cloud.config import CloudConfig, ExpertConfig
from cloud.errors import (EscalationError, ExpertTimeout, ExpertUnavailable, InvalidAnswer, InvalidEscalation,
                          InvalidFeedback, RegistryError)
from cloud.experts.protocol import Runner
from cloud.feedback.recorder import FeedbackRecorder
from cloud.feedback.records import check, escalation_record
from cloud.feedback.store import FeedbackStore
from cloud.registry.models import ModelRegistry
from cloud.registry.service import RegistryMetrics, RegistryServicer
from tandem.settings import load_config
from tandem.v1 import cloud_pb2, common_pb2

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SERVICER = "tandem.v1.cloud_pb2_grpc.add_CloudServicer_to_server"
REGISTRY_DEPLOYMENT = "Registry"


@serve.deployment
class Expert:
    """One vLLM engine answering the tasks routed to it. Concurrent calls share the engine:
    vLLM batches them continuously. Method names are the RPC names."""

    def __init__(self, cfg: dict[str, Any], tasks: dict[str, list[str]], max_text_bytes: int, timeout_s: float,
                 registry_app: str, recorder: dict[str, Any]) -> None:
        """`recorder`: FeedbackRecorder options (batch_size, interval_s, retries)."""
        from cloud.experts.engine import build_engine

        self._cfg = ExpertConfig.model_validate(cfg)
        self._tasks = tasks  # task -> labels
        self._max_text_bytes = max_text_bytes
        self._timeout_s = timeout_s
        self._registry_app = registry_app
        self._registry: DeploymentHandle | None = None
        self._feedback = FeedbackRecorder(self._send_feedback, **recorder)
        self._engine = build_engine(self._cfg)
        self._runner = self._build_runner(self._engine)
        self._in_flight = 0
        self._tags = {"expert": self._cfg.name}
        self._escalations = Counter("tandem_cloud_escalations", "Escalations by task, expert and gRPC status.",
                                    tag_keys=("task", "expert", "code"))
        self._latency = Histogram("tandem_expert_seconds", "Expert compute time per escalation.",
                                  LATENCY_BOUNDARIES, tag_keys=("expert",))
        self._batch = Histogram("tandem_expert_concurrent_requests", "Requests inside the engine when one starts (its batch).",
                                [1, 2, 4, 8, 16, 32, 64], tag_keys=("expert",))

    def _build_runner(self, engine: Any) -> Runner:
        if self._cfg.kind == "generate":
            from cloud.experts.generate import GenerateRunner

            return GenerateRunner(engine)
        from cloud.experts.classify import ClassifyRunner, checkpoint_labels

        model_labels = checkpoint_labels(self._cfg.model_path())
        for task, labels in self._tasks.items():
            if sorted(labels) != sorted(model_labels):
                raise ValueError(f"expert {self._cfg.name}: checkpoint labels differ from task {task}'s label set")
        return ClassifyRunner(engine, model_labels)

    async def Escalate(self, request: cloud_pb2.EscalateRequest, grpc_context: RayServegRPCContext) -> cloud_pb2.EscalateResponse:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        tags = {"task": request.task, "expert": self._cfg.name}
        try:
            response = await self._escalate(request)
        except EscalationError as exc:
            # Tracebacks for server-side failures; a bad request is not worth one.
            log.warning("escalation %s task=%s failed: %s %s", request.request_id, request.task, exc.code.name, exc,
                        exc_info=not isinstance(exc, InvalidEscalation))
            self._escalations.inc(tags={**tags, "code": exc.code.name})
            grpc_context.set_code(exc.code)
            grpc_context.set_details(str(exc))
            return cloud_pb2.EscalateResponse(request_id=request.request_id)
        self._escalations.inc(tags={**tags, "code": "OK"})
        log.info("escalation %s task=%s label=%s %.1f ms", request.request_id, request.task, response.label, response.expert_ms)
        self._record(request, response)
        return response

    def _record(self, request: cloud_pb2.EscalateRequest, response: cloud_pb2.EscalateResponse) -> None:
        record = escalation_record(request, response, int(time.time() * 1000))
        try:
            # Checked here, so that one odd record (say, an overlong request id) cannot get
            # its whole batch refused by the registry.
            check([record], None, self._max_text_bytes)
        except InvalidFeedback as exc:
            log.warning("escalation %s not recorded as feedback: %s", request.request_id, exc)
            return
        self._feedback.add(record)

    async def _send_feedback(self, records: list[cloud_pb2.FeedbackRecord]) -> None:
        if self._registry is None:
            # Looked up on first use, not at start: an expert answers even while the registry
            # application is missing (its records are retried, then dropped, with logs).
            self._registry = await asyncio.to_thread(serve.get_deployment_handle, REGISTRY_DEPLOYMENT, self._registry_app)
        await self._registry.store_feedback.remote(cloud_pb2.ReportFeedbackRequest(records=records))

    async def __del__(self) -> None:
        # Serve awaits `__del__` when it stops a replica gracefully, after in-flight requests
        # finish: the hook for sending the escalations still pending, and for stopping the
        # engine, whose EngineCore process otherwise outlives the replica (seen: orphaned
        # engines holding ~1.4 GB each after `tandem cloud serve` stopped).
        try:
            await self._feedback.close()
        finally:
            self._engine.shutdown()

    async def _escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        labels = self._tasks.get(request.task)
        if labels is None:
            raise InvalidEscalation("task", f"unknown task {request.task!r}; expert {self._cfg.name} answers {sorted(self._tasks)}")
        size = len(request.text.encode())
        if not request.text.strip():
            raise InvalidEscalation("text", "must not be empty or blank")
        if size > self._max_text_bytes:
            raise InvalidEscalation("text", f"{size} bytes exceeds the limit of {self._max_text_bytes} bytes")
        self._in_flight += 1
        self._batch.observe(self._in_flight, tags=self._tags)
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self._runner.answer(request.text, labels, request.request_id), self._timeout_s)
        except asyncio.TimeoutError as exc:
            raise ExpertTimeout(f"expert {self._cfg.name} did not answer within {self._timeout_s:.1f} s") from exc
        except EscalationError:
            raise  # the runner's own verdict (e.g. an answer cut off): not worth a retry
        except Exception as exc:  # a dead or broken engine: the health check gets the replica replaced
            raise ExpertUnavailable(f"expert {self._cfg.name} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._in_flight -= 1
        elapsed = time.perf_counter() - started
        self._latency.observe(elapsed, tags=self._tags)
        if answer.label not in labels:
            raise InvalidAnswer(f"expert {self._cfg.name} answered {answer.label!r}, not a label of task {request.task}")
        return cloud_pb2.EscalateResponse(
            request_id=request.request_id,
            label=answer.label,
            confidence=answer.confidence,
            distribution=[common_pb2.LabelScore(label=label, probability=p) for label, p in answer.distribution],
            expert=self._cfg.name,
            expert_ms=elapsed * 1e3,
        )

    async def check_health(self) -> None:
        # A real, tiny inference: vLLM's engine can hang while its process stays up.
        labels = next(iter(self._tasks.values()))
        probe = self._runner.answer("health check", labels, f"health-{uuid.uuid4().hex}")
        await asyncio.wait_for(probe, timeout=self._cfg.deployment.health_check_timeout_s)


# One replica, no CPU reserved: it is I/O-bound and must not take an expert's CPU. One
# replica is the feedback store's one writer (see FeedbackStore): with more, a record that
# reaches two replicas at once may be stored twice, which FeedbackStore.read hides.
@serve.deployment(name=REGISTRY_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class Registry(RegistryServicer):
    """ReportFeedback, GetManifest and FetchModel behind Serve's gRPC proxy, and the
    escalations the experts record (`store_feedback`, through a DeploymentHandle)."""

    def __init__(self, feedback_uri: str, registry_dir: str, tasks: dict[str, list[str]], max_text_bytes: int,
                 max_batch: int) -> None:
        super().__init__(FeedbackStore(feedback_uri, tasks, max_text_bytes), ModelRegistry(Path(registry_dir)),
                         ServeRegistryMetrics(), max_batch)

    async def FetchModel(self, request: cloud_pb2.FetchModelRequest,
                         grpc_context: RayServegRPCContext) -> AsyncIterator[cloud_pb2.ModelChunk]:
        async for chunk in super().FetchModel(request, grpc_context):
            yield chunk
        if grpc_context.code():
            # Serve carries a stream's context to the client only with a message; an exception
            # carries the status the servicer set.
            raise RegistryError(grpc_context.details())

    async def store_feedback(self, request: cloud_pb2.ReportFeedbackRequest) -> None:
        await self.store(request.records)


class ServeRegistryMetrics(RegistryMetrics):
    """Exported on Ray's metrics port, prefixed "ray_"."""

    def __init__(self) -> None:
        self._requests = Counter("tandem_registry_requests", "Registry RPCs by method and gRPC status.",
                                 tag_keys=("method", "code"))
        self._records = Counter("tandem_feedback_records", "Feedback records by task, kind and outcome (stored, duplicate).",
                                tag_keys=("task", "kind", "outcome"))

    def request(self, method: str, code: grpc.StatusCode) -> None:
        self._requests.inc(tags={"method": method, "code": code.name})

    def feedback(self, task: str, kind: str, outcome: str, count: int) -> None:
        self._records.inc(count, tags={"task": task, "kind": kind, "outcome": outcome})


def build_apps(cfg: CloudConfig) -> dict[str, serve.Application]:
    """The registry application first (the experts send it their escalations), then one per
    expert, named after it, answering the tasks routed to it."""
    labels = {name: task.spec.label_names() for name, task in cfg.tasks.items()}
    registry = Registry.bind(cfg.feedback_uri, str(cfg.registry_dir), labels, cfg.max_text_bytes, cfg.feedback_max_batch)
    recorder = {"batch_size": cfg.feedback_flush_records, "interval_s": cfg.feedback_flush_s, "retries": cfg.feedback_retries}
    experts = {
        expert.name: Expert.options(**_deployment_options(expert)).bind(
            expert.model_dump(mode="json"),
            {name: labels[name] for name, task in cfg.tasks.items() if task.expert == expert.name},
            cfg.max_text_bytes,
            cfg.expert_timeout_s,
            cfg.registry_app,
            recorder,
        )
        for expert in cfg.experts
    }
    return {cfg.registry_app: registry, **experts}


def _deployment_options(expert: ExpertConfig) -> dict[str, Any]:
    d = expert.deployment
    options: dict[str, Any] = {
        "name": expert.name,
        "max_ongoing_requests": d.max_ongoing_requests,
        # Past this, Serve's proxy answers RESOURCE_EXHAUSTED at once.
        "max_queued_requests": d.max_queued_requests,
        "health_check_period_s": d.health_check_period_s,
        "health_check_timeout_s": d.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "runtime_env": {"env_vars": expert.env}},
    }
    if d.autoscaling_config is not None:
        options["autoscaling_config"] = d.autoscaling_config
    else:
        options["num_replicas"] = d.num_replicas
    return options


def app_builder(args: dict[str, str]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy`: args.config is the cloud YAML,
    args.expert the expert this application serves."""
    return build_apps(load_config(CloudConfig, args.get("config")))[args["expert"]]


def registry_builder(args: dict[str, str]) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` of the registry: args.config is the cloud YAML."""
    cfg = load_config(CloudConfig, args.get("config"))
    return build_apps(cfg)[cfg.registry_app]
