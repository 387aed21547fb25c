"""Every error the edge raises, in one tree.

    EdgeError
    ├── InvalidRequest      bad input from the caller  → INVALID_ARGUMENT
    │   └── UnknownTask
    ├── FeedbackOff         a correction sent to a daemon that records nothing → FAILED_PRECONDITION
    ├── FeedbackRefused     the outbox did not take a correction (full, failing) → RESOURCE_EXHAUSTED
    ├── ArtifactError       a student artifact that must not be served
    └── CloudError          a cloud call failed         → local fallback, delivery retry, or no update;
                                                          never the caller's error

The gRPC boundary (`edge.service`) is the one place these become status codes.
"""

import grpc


class EdgeError(Exception):
    """Base of Tandem edge errors."""


class InvalidRequest(EdgeError):
    """The request breaks a documented limit; the message names the field and the limit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class UnknownTask(InvalidRequest):
    def __init__(self, task: str, known: list[str]) -> None:
        super().__init__("task", f"unknown task {task!r}; this daemon serves {sorted(known)}")


class FeedbackOff(EdgeError):
    """This daemon keeps no feedback: no outbox configured, or no cloud to deliver to."""


class FeedbackRefused(EdgeError):
    """The outbox did not accept a record: it is full, or its storage failed (see the log)."""


class ArtifactError(EdgeError):
    """A student artifact is missing files, fails its checksum, or does not load."""


class CloudError(EdgeError):
    """A cloud call did not succeed; `reason` says why, for metrics and responses."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"cloud answered {code.name}: {details}")
        self.code = code
        self.reason = f"cloud_{code.name.lower()}"
