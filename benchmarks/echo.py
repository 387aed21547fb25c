"""A raw grpc.aio echo server: the floor under any local unary RPC.

Run as `python -m benchmarks.echo` in its own process; it prints its port.
"""

import asyncio

import grpc

METHOD = "/tandem.bench.Echo/Echo"


def _identity(body: bytes) -> bytes:
    return body


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve() -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=_identity, response_serializer=_identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tandem.bench.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on port {port}", flush=True)
    await server.wait_for_termination()


def echo_callable(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(METHOD, request_serializer=_identity, response_deserializer=_identity)


if __name__ == "__main__":
    asyncio.run(serve())
