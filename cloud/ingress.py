"""What Serve's gRPC proxy registers (`grpc_servicer_functions` in the generated Serve
config): the cloud's services, with request parsers that hand a body which does not parse to
the deployment's error boundary (`tandem.wire`) instead of failing in the proxy with UNKNOWN.

Serve imports this module in its proxy actor, which makes it the place to quiet the proxy too
(see `drop_deliberate_statuses`).
"""

import logging

from ray.serve.exceptions import RequestCancelledError, gRPCStatusError

from tandem.v1 import expert_pb2_grpc, fleet_pb2_grpc
from tandem.wire import lenient

add_expert_servicer = lenient(expert_pb2_grpc.add_ExpertServicer_to_server)
add_fleet_servicer = lenient(fleet_pb2_grpc.add_FleetServicer_to_server)


def drop_deliberate_statuses(record: logging.LogRecord) -> bool:
    """A logging filter for Serve's and asyncio's loggers, against a traceback per request for
    what is no fault of the cloud:
    - Serve logs one in the replica and another in the proxy for every status a deployment sets
      and then raises. Tandem's deployments raise only to carry a refused stream's status out
      (`cloud.app.Fleet.FetchModel`), and log each refusal once themselves.
    - A client whose deadline passes cancels its call; Serve's proxy leaves the cancelled
      response task's RequestCancelledError unretrieved, which asyncio logs.
    A fuzzer, a misbehaving client or an overload would otherwise fill the log."""
    return not (record.exc_info and isinstance(record.exc_info[1], (gRPCStatusError, RequestCancelledError)))


logging.getLogger("ray.serve").addFilter(drop_deliberate_statuses)
logging.getLogger("asyncio").addFilter(drop_deliberate_statuses)
