"""The Edge gRPC service: validate, infer, decide, escalate or fall back; take corrections.

`EdgeService._answer` is the single place where edge errors become gRPC statuses.
"""

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from edge.cloud_client import Escalator
from edge.errors import (
    CloudError,
    FeedbackOff,
    FeedbackRefused,
    InvalidRequest,
    UnknownTask,
)
from edge.feedback import FeedbackRecorder
from edge.metrics import EdgeMetrics
from edge.redact import Redactor
from edge.runtime import TaskRuntime
from tandem.v1 import cloud_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128

Request = TypeVar("Request", edge_pb2.InferRequest, edge_pb2.CorrectRequest)
Response = TypeVar("Response", edge_pb2.InferResponse, edge_pb2.CorrectResponse)


class EdgeService(edge_pb2_grpc.EdgeServicer):
    def __init__(
        self,
        tasks: dict[str, TaskRuntime],
        escalator: Escalator | None,
        metrics: EdgeMetrics,
        max_text_bytes: int,
        redact: Redactor,
        device_id: str,
        feedback: FeedbackRecorder | None,
    ) -> None:
        self._tasks = tasks
        self._escalator = escalator
        self._metrics = metrics
        self._max_text_bytes = max_text_bytes
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
        self, handler: Callable[[Request], Awaitable[Response]], request: Request, context: grpc.aio.ServicerContext
    ) -> Response:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            self._metrics.rejected.labels(exc.field).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FeedbackOff as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except FeedbackRefused as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except Exception:
            log.exception("%s failed (request_id=%s)", type(request).__name__, request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the edge daemon; see its log")

    async def infer(self, request: edge_pb2.InferRequest) -> edge_pb2.InferResponse:
        """The service without gRPC (fleet mode calls it): raises InvalidRequest for bad input."""
        started = time.perf_counter()
        runtime, text = self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        serving = runtime.serving  # one version answers: its prediction, its label names
        result = await serving.batcher.submit(text)
        best = int(result.probs.argmax())
        confidence = float(result.probs[best])
        decision = runtime.policy.decide(confidence)
        response = edge_pb2.InferResponse(
            request_id=request_id,
            task=request.task,
            label=serving.student.labels[best],
            confidence=confidence,
            source=edge_pb2.EDGE,
            reason=decision.reason,
            model_version=serving.student.version,
            timings=edge_pb2.Timings(queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3),
        )
        if decision.escalate and self._escalator is not None:
            await self._escalate(response, text, self._escalator)
        if self._feedback is not None:
            await self._keep(response, text, self._feedback)
        elapsed = time.perf_counter() - started
        response.timings.total_ms = elapsed * 1e3
        self._record(response, elapsed, result.inference_s, result.batch_size)
        return response

    async def _correct(self, request: edge_pb2.CorrectRequest) -> edge_pb2.CorrectResponse:
        if self._feedback is None:
            raise FeedbackOff("this daemon keeps no feedback (feedback.outbox is None or cloud.target is unset)")
        runtime, text = self._validate(request)
        labels = runtime.serving.student.labels
        if request.label not in labels:
            raise InvalidRequest("label", f"{request.label!r} is not one of the {len(labels)} labels of {request.task!r}")
        record_id = await self._feedback.record(
            cloud_pb2.CORRECTION, request.task, text, request.request_id, label=request.label
        )
        if record_id is None:
            raise FeedbackRefused("the feedback outbox did not take the correction (full, or failing: see the "
                                  "daemon log); retry later")
        return edge_pb2.CorrectResponse(record_id=record_id)

    def _validate(self, request: edge_pb2.InferRequest | edge_pb2.CorrectRequest) -> tuple[TaskRuntime, str]:
        runtime = self._tasks.get(request.task)
        if runtime is None:
            raise UnknownTask(request.task, list(self._tasks))
        if len(request.text) > self._max_text_bytes:
            raise InvalidRequest("text", f"{len(request.text)} bytes exceeds the limit of {self._max_text_bytes} bytes")
        try:
            text = request.text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest("text", f"invalid UTF-8 at byte {exc.start}") from exc
        if not text.strip():
            raise InvalidRequest("text", "must not be empty or blank")
        rid = request.request_id
        if len(rid) > MAX_REQUEST_ID or not (rid.isascii() and rid.isprintable()):
            raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID} printable ASCII characters")
        return runtime, text

    async def _escalate(self, response: edge_pb2.InferResponse, text: str, escalator: Escalator) -> None:
        """Replaces the local answer with the cloud's, or marks it a fallback with the cause."""
        started = time.perf_counter()
        request = cloud_pb2.EscalateRequest(
            request_id=response.request_id,
            task=response.task,
            text=self._redact(text),
            edge=_prediction(response),
            device_id=self._device_id,
        )
        try:
            answer = await escalator.escalate(request)
        except CloudError as exc:
            log.warning("escalation failed, answering locally (request_id=%s): %s", response.request_id, exc)
            response.source = edge_pb2.EDGE_FALLBACK
            response.reason = exc.reason
        else:
            response.source = edge_pb2.CLOUD
            response.label = answer.label
            response.confidence = answer.confidence
            response.expert = answer.expert
        response.timings.cloud_ms = (time.perf_counter() - started) * 1e3

    async def _keep(self, response: edge_pb2.InferResponse, text: str, feedback: FeedbackRecorder) -> None:
        """Every fallback is recorded (its answer waits for the commit, so an answered fallback
        is never lost); an `audit_rate` sample of local answers is recorded in the background,
        sparing their latency a disk write."""
        if response.source == edge_pb2.EDGE_FALLBACK:
            await feedback.record(
                cloud_pb2.FALLBACK, response.task, text, response.request_id, _prediction(response)
            )
        elif response.source == edge_pb2.EDGE and feedback.audit_due():
            feedback.record_soon(cloud_pb2.AUDIT, response.task, text, response.request_id, _prediction(response))

    def _record(self, response: edge_pb2.InferResponse, elapsed: float, inference_s: float, batch: int) -> None:
        task, source = response.task, edge_pb2.Source.Name(response.source)
        self._metrics.requests.labels(task, source).inc()
        self._metrics.latency.labels(task, source).observe(elapsed)
        self._metrics.decisions.labels(task, response.reason).inc()
        self._metrics.inference.labels(task).observe(inference_s)
        self._metrics.batch_size.labels(task).observe(batch)


def _prediction(response: edge_pb2.InferResponse) -> cloud_pb2.EdgePrediction:
    """The student's answer, before any cloud answer replaced it."""
    return cloud_pb2.EdgePrediction(
        label=response.label, confidence=response.confidence, model_version=response.model_version
    )
