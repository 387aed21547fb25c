"""The Edge gRPC service: validate, infer, decide, escalate or fall back; take corrections.

`EdgeService._answer` is the single place where edge errors become gRPC statuses (a body that
does not parse included: see `tandem.wire`), and `EdgeService._validate` the one place the
edge checks a request's fields.
"""

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from edge.breaker import OPEN_REASON, CircuitBreaker
from edge.cloud_client import Escalator
from edge.config import EdgeConfig
from edge.errors import CloudCallError, FeedbackOff, FeedbackRefused, InvalidRequest, Overloaded, UnknownTask
from edge.feedback import FeedbackRecorder, top_margin
from edge.metrics import EdgeMetrics
from edge.policy import Policy
from edge.redact import Redactor
from edge.runtime import Serving, TaskRuntime
from edge.student import Student
from tandem import contract
from tandem.wire import Undecodable, parsed
from tandem.v1 import common_pb2, edge_pb2, edge_pb2_grpc, expert_pb2, fleet_pb2

log = logging.getLogger(__name__)

Request = TypeVar("Request", edge_pb2.InferRequest, edge_pb2.CorrectRequest)
Response = TypeVar("Response", edge_pb2.InferResponse, edge_pb2.CorrectResponse)


@dataclass(frozen=True)
class Answer:
    """Who answered a request, why, and what."""

    source: "edge_pb2.Source.ValueType"
    reason: str
    label: str
    confidence: float
    out_of_scope: bool
    label_set_version: int
    expert: str = ""
    receipt: common_pb2.Receipt | None = None  # the cloud's, with its answer (CLOUD)


class EdgeService(edge_pb2_grpc.EdgeServicer):
    def __init__(
        self,
        tasks: dict[str, TaskRuntime],
        escalator: Escalator | None,
        metrics: EdgeMetrics,
        redact: Redactor,
        device_id: str,
        feedback: FeedbackRecorder | None,
    ) -> None:
        self.tasks = tasks
        self._escalator = escalator
        self._metrics = metrics
        self._redact = redact
        self._device_id = device_id
        self._feedback = feedback

    async def Infer(self, request: edge_pb2.InferRequest, context: grpc.aio.ServicerContext) -> edge_pb2.InferResponse:
        return await self._answer(self.infer, request, context)

    async def Correct(
        self, request: edge_pb2.CorrectRequest, context: grpc.aio.ServicerContext
    ) -> edge_pb2.CorrectResponse:
        return await self._answer(self._correct, request, context)

    async def _answer(
        self,
        handler: Callable[[Request], Awaitable[Response]],
        request: Request | Undecodable,
        context: grpc.aio.ServicerContext,
    ) -> Response:
        try:
            return await handler(parsed(request))
        except contract.FieldError as exc:
            self._metrics.rejected.labels(exc.field).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FeedbackOff as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except FeedbackRefused as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Overloaded as exc:
            self._metrics.shed.labels(request.task).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Exception:
            log.exception("%s failed (request_id=%s)", type(request).__name__, request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the edge daemon; see its log")

    async def infer(self, request: edge_pb2.InferRequest) -> edge_pb2.InferResponse:
        """The service without gRPC (fleet mode calls it): raises FieldError for bad input."""
        started = time.perf_counter()
        runtime, text = self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        serving = runtime.serving  # one version answers: its prediction, its label names
        student = serving.student
        result = await serving.batcher.submit(text)
        best = int(result.probs.argmax())
        confidence = float(result.probs[best])  # the policy sees full precision, not the wire's float32
        local = common_pb2.EdgePrediction(label=student.labels[best], confidence=confidence, model_version=student.version)
        decision = runtime.policy.decide(confidence, student.manifest)  # this version's threshold, even mid-swap
        if decision.escalate and self._escalator is not None:
            escalation = expert_pb2.EscalateRequest(
                request_id=request_id, task=request.task, text=self._redact(text), edge=local, device_id=self._device_id
            )
            answer, cloud_s = await self._escalate(self._escalator, escalation, decision.reason, student)
        else:
            answer, cloud_s = _local(edge_pb2.EDGE, decision.reason, local, student), 0.0
        if self._feedback is not None:
            await self._keep(self._feedback, answer, request.task, text, request_id, local, result.probs)
        elapsed = time.perf_counter() - started
        self._count(request.task, answer, elapsed, result.inference_s, result.batch_size)
        return edge_pb2.InferResponse(
            request_id=request_id,
            task=request.task,
            label=answer.label,
            confidence=answer.confidence,
            source=answer.source,
            reason=answer.reason,
            model_version=local.model_version,
            expert=answer.expert,
            out_of_scope=answer.out_of_scope,
            label_set_version=answer.label_set_version,
            timings=edge_pb2.Timings(
                queue_ms=result.queue_s * 1e3,
                inference_ms=result.inference_s * 1e3,
                cloud_ms=cloud_s * 1e3,
                total_ms=elapsed * 1e3,
            ),
        )

    async def _correct(self, request: edge_pb2.CorrectRequest) -> edge_pb2.CorrectResponse:
        if self._feedback is None:
            raise FeedbackOff("this daemon keeps no feedback (feedback.outbox is None or cloud.target is unset)")
        runtime, text = self._validate(request)
        labels = runtime.serving.student.labels
        if request.label not in labels:
            raise InvalidRequest("label", f"{request.label!r} is not one of the {len(labels)} labels of {request.task!r}")
        version = runtime.serving.student.manifest.label_set_version
        record_id = await self._feedback.record(
            fleet_pb2.CORRECTION, request.task, text, request.request_id, version, label=request.label
        )
        if record_id is None:
            raise FeedbackRefused("the feedback outbox did not take the correction (full, or failing: see the "
                                  "daemon log); retry later")
        return edge_pb2.CorrectResponse(record_id=record_id)

    def _validate(self, request: edge_pb2.InferRequest | edge_pb2.CorrectRequest) -> tuple[TaskRuntime, str]:
        """The task's runtime and the decoded text; raises FieldError naming the bad field."""
        runtime = self.tasks.get(request.task)
        if runtime is None:
            raise UnknownTask(request.task, list(self.tasks))
        text = contract.decode_text("text", request.text)
        contract.check_request_id("request_id", request.request_id)
        return runtime, text

    @staticmethod
    async def _escalate(escalator: Escalator, request: expert_pb2.EscalateRequest, reason: str,
                        student: Student) -> tuple[Answer, float]:
        """The cloud's answer, or the edge's own (`request.edge`) as a fallback with the cause;
        and the seconds spent."""
        started = time.perf_counter()
        try:
            reply = await escalator.escalate(request)
        except CloudCallError as exc:
            # While the breaker is open every escalation falls back: it logged the cause once.
            level = logging.DEBUG if exc.reason == OPEN_REASON else logging.WARNING
            log.log(level, "escalation failed, answering locally (request_id=%s): %s", request.request_id, exc)
            answer = _local(edge_pb2.EDGE_FALLBACK, exc.reason, request.edge, student)
        else:
            answer = Answer(edge_pb2.CLOUD, reason, reply.label, reply.confidence, reply.out_of_scope,
                            reply.label_set_version, reply.expert, reply.receipt)
        return answer, time.perf_counter() - started

    @staticmethod
    async def _keep(
        feedback: FeedbackRecorder,
        answer: Answer,
        task: str,
        text: str,
        request_id: str,
        local: common_pb2.EdgePrediction,
        probs: np.ndarray,
    ) -> None:
        """Every cloud answer's receipt and every fallback is recorded, its answer waiting for
        the commit (so an answered escalation or fallback is never lost, and a request is
        recorded once: the cloud records nothing itself); an `audit_rate` sample of local
        answers (weighted by how unsure the student was, `probs`) is recorded in the
        background, sparing their latency a disk write."""
        if answer.receipt is not None:
            await feedback.record_receipt(task, request_id, answer.receipt)
        elif answer.source == edge_pb2.EDGE_FALLBACK:
            await feedback.record(fleet_pb2.FALLBACK, task, text, request_id, answer.label_set_version, local)
        elif answer.source == edge_pb2.EDGE and feedback.audit_due(task, top_margin(probs)):
            feedback.record_soon(fleet_pb2.AUDIT, task, text, request_id, answer.label_set_version, local)

    def _count(self, task: str, answer: Answer, elapsed: float, inference_s: float, batch: int) -> None:
        source = edge_pb2.Source.Name(answer.source)
        self._metrics.requests.labels(task, source).inc()
        if answer.out_of_scope:
            self._metrics.out_of_scope.labels(task, source).inc()
        self._metrics.latency.labels(task, source).observe(elapsed)
        self._metrics.decisions.labels(task, answer.reason).inc()
        self._metrics.inference.labels(task).observe(inference_s)
        self._metrics.batch_size.labels(task).observe(batch)


def _local(source: "edge_pb2.Source.ValueType", reason: str, prediction: common_pb2.EdgePrediction,
           student: Student) -> Answer:
    """The student's own answer."""
    out_of_scope = student.out_of_scope is not None and prediction.label == student.out_of_scope.label
    return Answer(source, reason, prediction.label, prediction.confidence, out_of_scope,
                  student.manifest.label_set_version)


def build_service(
    cfg: EdgeConfig,
    servings: Mapping[str, Serving],
    metrics: EdgeMetrics,
    escalator: Escalator | None,
    feedback: FeedbackRecorder | None = None,
    device_id: str | None = None,
) -> EdgeService:
    """The service `cfg` describes, over students already serving: a policy per task (at its
    student's threshold, reported in `tandem_edge_threshold`), the configured redaction,
    escalations through a circuit breaker, and `device_id` (default: the configured one) in
    escalations."""
    tasks: dict[str, TaskRuntime] = {}
    for task, serving in servings.items():
        policy = Policy(cfg.policy, on_threshold=metrics.threshold.labels(task).set)
        policy.adopt(serving.student.manifest)  # logged and reported at start, not at the first request
        tasks[task] = TaskRuntime(serving, policy, cfg.max_batch, cfg.max_queue)
    guarded = CircuitBreaker(escalator, cfg.cloud.breaker, metrics) if escalator is not None else None
    return EdgeService(tasks, guarded, metrics, Redactor(cfg.redaction), device_id or cfg.device_id, feedback)

