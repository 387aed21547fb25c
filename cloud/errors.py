"""Every error the cloud turns into a gRPC status, in one tree.

    CloudError
    ├── InvalidInput             (base of the two INVALID_ARGUMENT errors below; a contract.FieldError)
    ├── EscalationError
    │   ├── InvalidEscalation    bad request          → INVALID_ARGUMENT
    │   ├── ExpertTimeout        expert too slow, or the caller's deadline passed → DEADLINE_EXCEEDED
    │   ├── ExpertUnavailable    engine or replica down → UNAVAILABLE (edges retry: another replica may answer)
    │   └── InvalidAnswer        no whole label in the answer → INTERNAL (not retried: it would recur)
    └── FleetError
        ├── InvalidFeedback      bad feedback record or batch → INVALID_ARGUMENT
        ├── NotFound             unknown task, no promoted or no such version → NOT_FOUND
        ├── FleetTimeout         a step of the RPC's work outlasted fleet.request_timeout_s → DEADLINE_EXCEEDED (edges retry later)
        └── StoreUnavailable     the feedback store or the model registry failed to read or write → UNAVAILABLE (edges retry later)

`cloud.app.Expert.Escalate` and `cloud.registry.service.FleetServicer` are the places
these become statuses. A full queue never reaches them: Serve's proxy refuses past
`max_queued_requests` with RESOURCE_EXHAUSTED.
"""

from typing import Self

import grpc

from tandem.contract import FieldError


class CloudError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidInput(FieldError, CloudError):
    """Input that breaks a documented limit; the message names the field and the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def of(cls, error: FieldError) -> Self:
        """`error` (a failed contract check) as this kind of cloud error, with the same message."""
        return cls(error.field, str(error).removeprefix(f"{error.field}: "))


class EscalationError(CloudError):
    pass


class InvalidEscalation(InvalidInput, EscalationError):
    pass


class ExpertTimeout(EscalationError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ExpertUnavailable(EscalationError):
    code = grpc.StatusCode.UNAVAILABLE


class InvalidAnswer(EscalationError):
    code = grpc.StatusCode.INTERNAL


class FleetError(CloudError):
    pass


class InvalidFeedback(InvalidInput, FleetError):
    pass


class NotFound(FleetError):
    code = grpc.StatusCode.NOT_FOUND


class FleetTimeout(FleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreUnavailable(FleetError):
    code = grpc.StatusCode.UNAVAILABLE
