"""`python -m benchmarks.trace_escalation`: the hand-written files that one escalation runs
through, from `Edge.Infer` on the device to the expert and back.

The edge daemon and the classify expert's deployment class run in this process, the expert
behind a plain grpc.aio server where Serve's proxy would be (Ray's code, not ours), with the
Fleet service beside it for the routes. The daemon escalates every request (policy
`cloud_only`) and keeps no feedback (so the receipt the expert signs is not kept either).
After a warm-up escalation, a profile hook in every
thread records the files whose functions run during one more. Generated stubs, error classes,
config models and metrics declarations are left out of the count. Prints JSON.
"""

import asyncio
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import ray

from cloud.app import Expert, expert_args
from cloud.config import CloudConfig
from cloud.feedback.receipts import create_key
from cloud.feedback.store import FeedbackStore
from cloud.registry.models import ModelRegistry
from cloud.registry.service import FleetServicer
from edge.config import EdgeConfig
from edge.daemon import EdgeDaemon
from tandem import envs
from tandem.settings import load_config
from tandem.v1 import edge_pb2, edge_pb2_grpc, expert_pb2_grpc, fleet_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
EXPERT = "banking77-classifier"
# Not counted: what the issue leaves out of the count.
SKIPPED = ("tandem/v1/", "errors.py", "config.py", "settings.py", "metrics.py")


class _Trace:
    """Files of this repository whose functions are called while `on`, in any thread."""

    def __init__(self) -> None:
        self.on = False
        self.files: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.on and event == "call":
            self.files.add(frame.f_code.co_filename)

    def repo_files(self) -> list[str]:
        inside = (Path(f) for f in self.files if f.startswith(str(ROOT)))
        names = sorted(str(p.relative_to(ROOT)) for p in inside if ".venv" not in p.parts)
        return [n for n in names if not n.startswith("tests/") and n != "benchmarks/trace_escalation.py"]


async def _trace(trace: _Trace, scratch: Path) -> dict[str, Any]:
    cloud_cfg = load_config(CloudConfig, ROOT / "cloud" / "cloud.yaml")
    # Insecure: the trace is of the escalation's own path; the TLS proxy (nginx) runs no Python.
    cloud_cfg = cloud_cfg.model_copy(update={"receipt_key": scratch / "receipt.key", "insecure": True})
    create_key(cloud_cfg.receipt_key)
    expert_cfg = next(e for e in cloud_cfg.experts if e.name == EXPERT)
    os.environ.update(expert_cfg.env)  # what Serve gives the replica (vLLM reads it)
    expert = Expert.func_or_class(*expert_args(cloud_cfg, expert_cfg))
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServicer_to_server(expert, server)
    fleet = FleetServicer(FeedbackStore(str(scratch / "feedback")), ModelRegistry(scratch / "registry"),
                          routes=cloud_cfg.routes(), insecure=True)
    fleet_pb2_grpc.add_FleetServicer_to_server(fleet, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    student = envs.TANDEM_CACHE_DIR / "models" / "banking77" / "student"
    daemon = EdgeDaemon(EdgeConfig(
        listen="127.0.0.1:0", metrics_port=None, tasks={"banking77": student}, policy={"mode": "cloud_only"},
        cloud={"target": f"127.0.0.1:{port}", "insecure": True}, feedback={"outbox": None}, updater={"enabled": False},
    ))
    edge_port = await daemon.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_port}") as channel:
            edge = edge_pb2_grpc.EdgeStub(channel)
            request = edge_pb2.InferRequest(task="banking77", text=b"I still have not received my new card")
            await edge.Infer(request, timeout=60)  # warm-up: routes, channels, sessions
            trace.on = True
            answer = await edge.Infer(request, timeout=60)
            trace.on = False
    finally:
        await daemon.stop(grace_s=0)
        await server.stop(0)
        expert._engine.shutdown()
    files = trace.repo_files()
    counted = [f for f in files if not f.endswith(SKIPPED) and not f.startswith(SKIPPED)]
    return {"source": edge_pb2.Source.Name(answer.source), "expert": answer.expert,
            "files_counted": len(counted), "counted": counted, "not_counted": sorted(set(files) - set(counted))}


def main() -> None:
    trace = _Trace()
    # Installed before any thread starts, so the model thread and gRPC's are traced too.
    sys.setprofile(trace)
    threading.setprofile(trace)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")  # the expert's metrics need Ray
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-trace-") as scratch:
            result = asyncio.run(_trace(trace, Path(scratch)))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        ray.shutdown()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
