"""The Edge gRPC service: validate, infer, decide, escalate or fall back.

`EdgeService.Infer` is the single place where edge errors become gRPC statuses.
"""

import logging
import time
import uuid
from dataclasses import dataclass

import grpc

from edge.batcher import MicroBatcher
from edge.cloud_client import Escalator
from edge.errors import CloudError, InvalidRequest, UnknownTask
from edge.metrics import EdgeMetrics
from edge.policy import Policy
from edge.student import Student
from tandem.v1 import cloud_pb2, edge_pb2, edge_pb2_grpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID = 128


@dataclass
class TaskRuntime:
    student: Student
    batcher: MicroBatcher
    policy: Policy


class EdgeService(edge_pb2_grpc.EdgeServicer):
    def __init__(
        self,
        tasks: dict[str, TaskRuntime],
        escalator: Escalator | None,
        metrics: EdgeMetrics,
        max_text_bytes: int,
    ) -> None:
        self._tasks = tasks
        self._escalator = escalator
        self._metrics = metrics
        self._max_text_bytes = max_text_bytes

    async def Infer(self, request: edge_pb2.InferRequest, context: grpc.aio.ServicerContext) -> edge_pb2.InferResponse:
        try:
            return await self.infer(request)
        except InvalidRequest as exc:
            self._metrics.rejected.labels(exc.field).inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception:
            log.exception("Infer failed (request_id=%s)", request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the edge daemon; see its log")

    async def infer(self, request: edge_pb2.InferRequest) -> edge_pb2.InferResponse:
        """The service without gRPC: raises InvalidRequest for bad input. Fleet mode calls it."""
        started = time.perf_counter()
        runtime, text = self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        result = await runtime.batcher.submit(text)
        best = int(result.probs.argmax())
        confidence = float(result.probs[best])
        decision = runtime.policy.decide(confidence)
        response = edge_pb2.InferResponse(
            request_id=request_id,
            task=request.task,
            label=runtime.student.labels[best],
            confidence=confidence,
            source=edge_pb2.EDGE,
            reason=decision.reason,
            model_version=runtime.student.version,
            timings=edge_pb2.Timings(queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3),
        )
        if decision.escalate and self._escalator is not None:
            await self._escalate(response, text, self._escalator)
        elapsed = time.perf_counter() - started
        response.timings.total_ms = elapsed * 1e3
        self._record(response, elapsed, result.inference_s, result.batch_size)
        return response

    def _validate(self, request: edge_pb2.InferRequest) -> tuple[TaskRuntime, str]:
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
            text=text,
            edge=cloud_pb2.EdgePrediction(
                label=response.label, confidence=response.confidence, model_version=response.model_version
            ),
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

    def _record(self, response: edge_pb2.InferResponse, elapsed: float, inference_s: float, batch: int) -> None:
        task, source = response.task, edge_pb2.Source.Name(response.source)
        self._metrics.requests.labels(task, source).inc()
        self._metrics.latency.labels(task, source).observe(elapsed)
        self._metrics.decisions.labels(task, response.reason).inc()
        self._metrics.inference.labels(task).observe(inference_s)
        self._metrics.batch_size.labels(task).observe(batch)
