"""A FleetServicer on a plain grpc.aio server, registered as Serve's proxy registers it."""

import contextlib
from collections.abc import AsyncIterator

import grpc

from cloud.ingress import add_fleet_servicer
from cloud.registry.service import FleetServicer
from tandem.v1 import fleet_pb2_grpc


@contextlib.asynccontextmanager
async def serving(servicer: FleetServicer) -> AsyncIterator[fleet_pb2_grpc.FleetStub]:
    """A stub connected to `servicer` on a free loopback port, until the block ends."""
    server = grpc.aio.server()
    add_fleet_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield fleet_pb2_grpc.FleetStub(channel)
    finally:
        await server.stop(0)
