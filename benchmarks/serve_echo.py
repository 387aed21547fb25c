"""A Serve app implementing tandem.v1.Expert that answers at once: the floor of the Serve
gRPC proxy path, measured beside the real applications on the same proxy."""

from ray import serve

from tandem.v1 import expert_pb2


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EchoExpert:
    async def Escalate(self, request: expert_pb2.EscalateRequest) -> expert_pb2.EscalateResponse:
        return expert_pb2.EscalateResponse(request_id=request.request_id, label=request.text)
