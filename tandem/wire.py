"""Registering a gRPC service so that a request body that does not parse reaches the
service's own error boundary (INVALID_ARGUMENT naming the message type) instead of gRPC's:
grpcio answers a deserializer's exception with UNKNOWN and logs a traceback for every such
call, so a fuzzer or a broken client would flood the log and see a status that says "bug".

`lenient(add_XServicer_to_server)` takes a generated registration function and returns one
with the same signature, which also works as an entry of Serve's `grpc_servicer_functions`
(Serve's gRPC proxy keeps each method's request parser and replaces only its behaviour).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from tandem.contract import FieldError

Add = Callable[[Any, Any], None]
T = TypeVar("T", bound=Message)


@dataclass(frozen=True)
class Undecodable:
    """What a lenient parser returns for a body that is not a valid message of its type."""

    type_name: str  # the message's full name, e.g. tandem.v1.InferRequest
    size: int


def parsed(request: T | Undecodable) -> T:
    """`request`, or FieldError naming its message type if its body did not parse."""
    if isinstance(request, Undecodable):
        raise FieldError(request.type_name.rsplit(".", 1)[-1],
                         f"the {request.size}-byte body is not a valid {request.type_name} message")
    return request


def lenient(add: Add) -> Add:
    """`add` (a generated add_*Servicer_to_server) with request parsers that return
    Undecodable instead of raising."""

    def add_lenient(servicer: Any, server: Any) -> None:
        add(servicer, _Rewriting(server))

    add_lenient.__doc__ = f"{add.__name__}, with lenient request parsers (tandem.wire)."
    return add_lenient


class _Rewriting:
    """Stands in for the server while the generated function registers its handlers."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        rewritten = []
        for handler in handlers:
            service = handler.service_name()
            methods = {name.rsplit("/", 1)[-1]: _lenient_handler(h) for name, h in handler._method_handlers.items()}
            rewritten.append(grpc.method_handlers_generic_handler(service, methods))
        self._server.add_generic_rpc_handlers(tuple(rewritten))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service, {m: _lenient_handler(h) for m, h in handlers.items()})


def _lenient_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    if parse is None:
        return handler
    message: type[Message] = parse.__self__  # the generated code passes Message.FromString

    def parse_leniently(body: bytes) -> Message | Undecodable:
        try:
            return parse(body)
        except DecodeError:
            return Undecodable(message.DESCRIPTOR.full_name, len(body))

    return handler._replace(request_deserializer=parse_leniently)
