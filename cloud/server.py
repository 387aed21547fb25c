"""`tandem cloud serve`: a local Ray cluster, Serve with gRPC ingress, and the applications of
the generated Serve config (`cloud.topology`), built by the same builders `serve run` calls;
until SIGTERM. Stopping leaves no process behind."""

import contextlib
import ctypes
import importlib
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import ray
from ray import serve
from ray.serve.config import gRPCOptions, HTTPOptions

from cloud import proxy
from cloud.config import CloudConfig
from cloud.feedback import receipts
from cloud.registry.routes import RouteStore
from cloud.topology import serve_config
from tandem.contract import FLEET_APPLICATION, MESSAGE_MAX_BYTES
from tandem.fsio import atomic_write
from tandem.settings import load_config

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
STOP_GRACE_S = 5.0
RAY_AUTH_MODE = "RAY_AUTH_MODE"  # what ray.init sets for the cluster it starts ("token" unless told otherwise)


def serve_forever(config: Path) -> None:
    """Serves the cloud configured by the YAML file `config` until SIGTERM or SIGINT."""
    with running_cloud(config) as cfg:
        stop = threading.Event()
        # Installed after ray.init, which installs its own SIGTERM handler (exit at once, with
        # a traceback, skipping the orderly stop below). These only set the event: a signal
        # must not interrupt Ray's code mid-call.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        # One parseable line: scripts and tests wait for it before sending traffic. The edges'
        # port: the TLS proxy's, or Serve's own for an insecure development cloud.
        print(f"tandem cloud listening on port {cfg.grpc_port if cfg.insecure else cfg.proxy.port}", flush=True)
        stop.wait()


@contextlib.contextmanager
def running_cloud(config: Path) -> Iterator[CloudConfig]:
    """The cloud of `config` on a local Ray cluster for the block, behind the TLS proxy unless
    `insecure`, its receipt key created if missing; on exit the proxy stops first, then the
    experts (each stopping its engine), then Serve and Ray, then every process started
    meanwhile that is still alive."""
    cfg = load_config(CloudConfig, config)
    topology = serve_config(cfg, str(config))
    if not cfg.insecure:
        proxy.check_ready(cfg.proxy)  # before the slow start of Ray and the experts
    if receipts.create_key(cfg.receipt_key):
        log.info("created the receipt key %s (receipt_key): keep it, edges hold receipts signed with it", cfg.receipt_key)
    # Set before ray.init: the local Ray workers, and so the replicas, inherit the environment.
    # A token the environment already holds is kept (a benchmark that also calls Serve's port
    # directly sets one); otherwise a fresh one, which only this process and its children know.
    token = os.environ["TANDEM_PROXY_TOKEN"] = os.environ.get("TANDEM_PROXY_TOKEN") or secrets.token_urlsafe(32)
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(MESSAGE_MAX_BYTES)
    # Processes orphaned by a dying parent (vLLM's engine, Ray's agents) become this process's
    # children, so that stopping finds and ends them.
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed (errno %d): orphans may outlive the cloud", ctypes.get_errno())
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _metrics_export_port=cfg.ray_metrics_port)
    try:
        serve.start(
            # Locally, Serve's HTTP proxy (health only) listens on loopback alone.
            http_options=HTTPOptions(host="127.0.0.1", port=cfg.http_port),
            grpc_options=gRPCOptions(**topology["grpc_options"]),
            logging_config=topology["logging_config"],
        )
        # The config's experts serve again: the versions a rollout switched to are not deployed.
        RouteStore(cfg.routes_file()).reset()
        for app in topology["applications"]:
            serve.run(_build(app), name=app["name"], route_prefix=app["route_prefix"],
                      logging_config=topology["logging_config"])
        # For `tandem cloud rollout-expert`, which deploys beside these on this cluster, and must
        # know whether it takes the token (~/.ray/auth_token) Ray's local clusters require by default.
        atomic_write(cfg.ray_address_file(), json.dumps({"address": ray.get_runtime_context().gcs_address,
                                                         "auth_mode": os.environ.get(RAY_AUTH_MODE)}).encode())
        with contextlib.nullcontext() if cfg.insecure else proxy.running_proxy(cfg.proxy, cfg.grpc_port, token):
            yield cfg
        for name in serve.status().applications:  # the experts (a rollout's versions too), each stopping its engine
            if name != FLEET_APPLICATION:
                serve.delete(name)
    finally:
        try:
            cfg.ray_address_file().unlink(missing_ok=True)
            serve.shutdown()
            ray.shutdown()
        finally:
            _end_descendants(before)


def _build(app: dict[str, Any]) -> serve.Application:
    """What `serve run` does with an application's `import_path` and `args`."""
    module, name = app["import_path"].split(":")
    return getattr(importlib.import_module(module), name)(app["args"])


def _end_descendants(keep: set[int]) -> None:
    """SIGTERM to every descendant not in `keep`, SIGKILL to those still alive after
    STOP_GRACE_S (Ray's agents ignore SIGTERM); reaps them."""
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in keep]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    if procs:
        log.info("stopped %d leftover processes (%d killed)", len(procs), len(alive))
