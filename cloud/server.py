"""`tandem cloud serve`: a local Ray cluster, Serve with gRPC ingress, the apps, until SIGTERM."""

import os
import signal
import threading

import ray
from ray import serve
from ray.serve.config import gRPCOptions, HTTPOptions

from cloud.app import SERVICER, build_apps
from cloud.config import CloudConfig


def serve_forever(cfg: CloudConfig) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _metrics_export_port=cfg.ray_metrics_port)
    try:
        serve.start(
            http_options=HTTPOptions(host="127.0.0.1", port=cfg.http_port),
            grpc_options=gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=[SERVICER]),
        )
        for name, app in build_apps(cfg).items():  # the registry first: experts send it feedback
            serve.run(app, name=name, route_prefix=f"/{name}")
        # One parseable line: scripts and tests wait for it before sending traffic.
        print(f"tandem cloud listening on port {cfg.grpc_port}", flush=True)
        stop.wait()
        # Stopping experts send their pending escalation records: while the registry still runs.
        for expert in cfg.experts:
            serve.delete(expert.name)
    finally:
        serve.shutdown()
        ray.shutdown()
