"""Every error the cloud turns into a gRPC status, in one tree.

    CloudError
    ├── InvalidInput             (base of the INVALID_ARGUMENT errors below; a contract.FieldError)
    ├── NotAuthenticated         (base of the UNAUTHENTICATED errors below: no verified device identity)
    ├── EscalationError
    │   ├── InvalidEscalation    bad request          → INVALID_ARGUMENT
    │   ├── UnauthenticatedEscalation  not through the proxy, or no device certificate → UNAUTHENTICATED
    │   ├── ExpertTimeout        expert too slow, or the caller's deadline passed → DEADLINE_EXCEEDED
    │   ├── ExpertUnavailable    engine or replica down → UNAVAILABLE (edges retry: another replica may answer)
    │   └── InvalidAnswer        no whole label in the answer → INTERNAL (not retried: it would recur)
    └── FleetError
        ├── InvalidFeedback      bad feedback record or batch → INVALID_ARGUMENT
        ├── InvalidRequest       bad field of another Fleet request → INVALID_ARGUMENT
        ├── UnauthenticatedFleetCall  not through the proxy, or no device certificate → UNAUTHENTICATED
        ├── PermissionDenied     a device writing as another, or an ESCALATION record without a valid receipt of its own → PERMISSION_DENIED
        ├── QuotaExceeded        a device's records today would pass fleet.device_quota_per_day → RESOURCE_EXHAUSTED
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


class NotAuthenticated(CloudError):
    """The caller has no verified device identity (`cloud.identity.caller_device` refused it)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class EscalationError(CloudError):
    pass


class InvalidEscalation(InvalidInput, EscalationError):
    pass


class UnauthenticatedEscalation(NotAuthenticated, EscalationError):
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


class InvalidRequest(InvalidInput, FleetError):
    pass


class UnauthenticatedFleetCall(NotAuthenticated, FleetError):
    pass


class PermissionDenied(FleetError):
    """An authenticated device asked for what its identity does not allow; `field` names what."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class QuotaExceeded(FleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(FleetError):
    code = grpc.StatusCode.NOT_FOUND


class FleetTimeout(FleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreUnavailable(FleetError):
    code = grpc.StatusCode.UNAVAILABLE
