"""Every error the edge raises, in one tree.

    EdgeError
    ├── InvalidRequest      bad input from the caller (also a contract.FieldError) → INVALID_ARGUMENT
    │   └── UnknownTask
    ├── FeedbackOff         a correction sent to a daemon that records nothing → FAILED_PRECONDITION
    ├── FeedbackRefused     the outbox did not take a correction (full, failing) → RESOURCE_EXHAUSTED
    ├── Overloaded          the task's queue for the model is full (max_queue)   → RESOURCE_EXHAUSTED
    ├── ArtifactError       a student artifact that must not be served
    └── CloudCallError      a call to the cloud failed → local fallback, delivery retry, or no update;
        └── NoRoute             the cloud names no expert for the task   never the caller's error

The gRPC boundary (`edge.service`) is the one place these become status codes; it catches
`contract.FieldError`, which the contract's own checks raise too.
"""

import grpc

from tandem.contract import FieldError


class EdgeError(Exception):
    """Base of Tandem edge errors."""


class InvalidRequest(EdgeError, FieldError):
    """The request breaks a documented limit; the message names the field and the limit."""


class UnknownTask(InvalidRequest):
    def __init__(self, task: str, known: list[str]) -> None:
        super().__init__("task", f"unknown task {task!r}; this daemon serves {sorted(known)}")


class FeedbackOff(EdgeError):
    """This daemon keeps no feedback: no outbox configured, or no cloud to deliver to."""


class FeedbackRefused(EdgeError):
    """The outbox did not accept a record: it is full, or its storage failed (see the log)."""


class Overloaded(EdgeError):
    """The model's queue is full: shed at once rather than queue without bound."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"edge overloaded: {queued} requests already wait for the model (max_queue is {limit}); "
                         "retry later")


class ArtifactError(EdgeError):
    """A student artifact is missing files, fails its checksum, or does not load."""


class CloudCallError(EdgeError):
    """A cloud call did not succeed; `reason` says why, for metrics and responses."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None = None) -> None:
        super().__init__(f"cloud answered {code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason or f"cloud_{code.name.lower()}"


class NoRoute(CloudCallError):
    """The cloud's routes name no expert application for the task."""

    def __init__(self, task: str) -> None:
        super().__init__(grpc.StatusCode.NOT_FOUND, f"no expert application for task {task!r}", "cloud_no_route")
