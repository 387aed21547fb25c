"""The Ray Serve application: a gRPC ingress (`tandem.v1.Cloud`) routing by task to
one Expert deployment per configured vLLM model.

`serve run cloud/serve_config.yaml` and `tandem cloud serve` both build it with `app_builder`.
"""

import asyncio
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from cloud.config import CloudConfig, ExpertConfig
from cloud.errors import (
    EscalationError,
    ExpertTimeout,
    ExpertUnavailable,
    InvalidAnswer,
    InvalidEscalation,
    Overloaded,
)
from cloud.experts.protocol import Answer, Runner
from tandem.settings import load_config
from tandem.v1 import cloud_pb2, common_pb2

log = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
SERVICER = "tandem.v1.cloud_pb2_grpc.add_CloudServicer_to_server"


@serve.deployment
class Expert:
    """One vLLM engine. Concurrent calls share it: vLLM batches them continuously."""

    def __init__(self, cfg: dict[str, Any], probe_labels: list[str]) -> None:
        from cloud.experts.engine import build_engine

        self._cfg = ExpertConfig.model_validate(cfg)
        self._probe_labels = probe_labels
        engine = build_engine(self._cfg)
        self._runner: Runner
        if self._cfg.kind == "classify":
            from cloud.experts.classify import ClassifyRunner, checkpoint_labels

            model_labels = checkpoint_labels(self._cfg.model_path())
            if sorted(model_labels) != sorted(probe_labels):
                raise ValueError(f"expert {self._cfg.name}: checkpoint labels differ from the task's label set")
            self._runner = ClassifyRunner(engine, model_labels)
        else:
            from cloud.experts.generate import GenerateRunner

            self._runner = GenerateRunner(engine)
        self._in_flight = 0
        self._peak_in_flight = 0
        self._latency = Histogram(
            "tandem_expert_seconds", "Expert compute time per escalation.", LATENCY_BOUNDARIES, tag_keys=("expert",)
        )
        self._batch = Histogram(
            "tandem_expert_concurrent_requests", "Requests inside the engine when one starts (its batch).",
            [1, 2, 4, 8, 16, 32, 64], tag_keys=("expert",),
        )

    async def answer(self, text: str, labels: list[str], request_id: str) -> tuple[Answer, float]:
        """The expert's answer and its compute time in seconds."""
        self._in_flight += 1
        self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        self._batch.observe(self._in_flight, tags={"expert": self._cfg.name})
        started = time.perf_counter()
        try:
            answer = await self._runner.answer(text, labels, request_id)
        finally:
            self._in_flight -= 1
        elapsed = time.perf_counter() - started
        self._latency.observe(elapsed, tags={"expert": self._cfg.name})
        return answer, elapsed

    def peak_in_flight(self) -> int:
        """Most requests the engine has held at once since start."""
        return self._peak_in_flight

    async def check_health(self) -> None:
        # A real, tiny inference: vLLM's engine can hang while its process stays up.
        probe = self._runner.answer("health check", self._probe_labels, f"health-{uuid.uuid4().hex}")
        await asyncio.wait_for(probe, timeout=self._cfg.deployment.health_check_timeout_s)


@serve.deployment
class CloudIngress:
    """Implements `tandem.v1.Cloud` behind Serve's gRPC proxy: method names are RPC names."""

    def __init__(self, routes: dict[str, tuple[str, list[str]]], experts: dict[str, DeploymentHandle],
                 max_text_bytes: int, expert_timeout_s: float) -> None:
        self._routes = routes  # task -> (expert name, labels)
        self._experts = experts
        self._max_text_bytes = max_text_bytes
        self._timeout_s = expert_timeout_s
        self._escalations = Counter(
            "tandem_cloud_escalations", "Escalations by task, expert and gRPC status.", tag_keys=("task", "expert", "code")
        )

    async def Escalate(self, request: cloud_pb2.EscalateRequest, grpc_context: RayServegRPCContext) -> cloud_pb2.EscalateResponse:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        expert = self._routes.get(request.task, ("none", []))[0]
        try:
            response = await self._escalate(request)
        except EscalationError as exc:
            log.warning("escalation %s task=%s failed: %s %s", request.request_id, request.task, exc.code.name, exc)
            self._escalations.inc(tags={"task": request.task, "expert": expert, "code": exc.code.name})
            grpc_context.set_code(exc.code)
            grpc_context.set_details(str(exc))
            return cloud_pb2.EscalateResponse(request_id=request.request_id)
        self._escalations.inc(tags={"task": request.task, "expert": expert, "code": "OK"})
        log.info("escalation %s task=%s expert=%s label=%s %.1f ms", request.request_id, request.task,
                 expert, response.label, response.expert_ms)
        return response

    async def _escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        if request.task not in self._routes:
            raise InvalidEscalation("task", f"unknown task {request.task!r}; this cloud serves {sorted(self._routes)}")
        size = len(request.text.encode())
        if not request.text.strip():
            raise InvalidEscalation("text", "must not be empty or blank")
        if size > self._max_text_bytes:
            raise InvalidEscalation("text", f"{size} bytes exceeds the limit of {self._max_text_bytes} bytes")
        expert, labels = self._routes[request.task]
        call = self._experts[expert].answer.remote(request.text, labels, request.request_id)
        try:
            answer, seconds = await asyncio.wait_for(call, timeout=self._timeout_s)
        except BackPressureError as exc:
            raise Overloaded(f"expert {expert} is at capacity; retry later") from exc
        except asyncio.TimeoutError as exc:
            call.cancel()
            raise ExpertTimeout(f"expert {expert} did not answer within {self._timeout_s:.1f} s") from exc
        except Exception as exc:  # a dead engine or replica: Serve replaces it, edges fall back
            raise ExpertUnavailable(f"expert {expert} failed: {type(exc).__name__}") from exc
        if answer.label not in labels:
            raise InvalidAnswer(f"expert {expert} answered {answer.label!r}, not a label of task {request.task}")
        return cloud_pb2.EscalateResponse(
            request_id=request.request_id,
            label=answer.label,
            confidence=answer.confidence,
            distribution=[common_pb2.LabelScore(label=l, probability=p) for l, p in answer.distribution],
            expert=expert,
            expert_ms=seconds * 1e3,
        )


def build_app(cfg: CloudConfig) -> serve.Application:
    """Binds one Expert per configured expert and the ingress in front of them."""
    labels = {name: task.spec.label_names() for name, task in cfg.tasks.items()}
    experts = {}
    for expert in cfg.experts:
        served = [name for name, task in cfg.tasks.items() if task.expert == expert.name]
        experts[expert.name] = Expert.options(**_deployment_options(expert)).bind(
            expert.model_dump(mode="json"), labels[served[0]]
        )
    routes = {name: (task.expert, labels[name]) for name, task in cfg.tasks.items()}
    ingress = CloudIngress.options(
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        max_queued_requests=cfg.ingress_max_queued_requests,
        # Routing only: no CPU reserved, so that experts get the cores.
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(routes, experts, cfg.max_text_bytes, cfg.expert_timeout_s)


def _deployment_options(expert: ExpertConfig) -> dict[str, Any]:
    d = expert.deployment
    options: dict[str, Any] = {
        "name": expert.name,
        "max_ongoing_requests": d.max_ongoing_requests,
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
    """Entry point for `serve run` / `serve deploy`: args.config is the cloud YAML."""
    return build_app(load_config(CloudConfig, args.get("config")))
