"""Every error the cloud turns into a gRPC status, in one tree.

    EscalationError
    ├── InvalidEscalation    bad request          → INVALID_ARGUMENT
    ├── ExpertTimeout        expert too slow      → DEADLINE_EXCEEDED
    ├── ExpertUnavailable    engine or replica down → UNAVAILABLE (edges retry: another replica may answer)
    └── InvalidAnswer        no whole label in the answer → INTERNAL (not retried: it would recur)

`cloud.app.Expert.Escalate` is the one place these become statuses. A full queue never
reaches it: Serve's proxy refuses past `max_queued_requests` with RESOURCE_EXHAUSTED.
"""

import grpc


class EscalationError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidEscalation(EscalationError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


class ExpertTimeout(EscalationError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ExpertUnavailable(EscalationError):
    code = grpc.StatusCode.UNAVAILABLE


class InvalidAnswer(EscalationError):
    code = grpc.StatusCode.INTERNAL
