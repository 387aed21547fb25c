"""A Serve app implementing tandem.v1.Cloud that answers at once: the floor of the
Serve gRPC proxy path, measured beside the real app on the same proxy."""

from ray import serve

from tandem.v1 import cloud_pb2


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EchoCloud:
    async def Escalate(self, request: cloud_pb2.EscalateRequest) -> cloud_pb2.EscalateResponse:
        return cloud_pb2.EscalateResponse(request_id=request.request_id, label=request.text)
