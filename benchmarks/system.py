"""The system's parts as real processes, for the demo and the benchmarks: the cloud
(`tandem cloud serve`) and edge daemons (`tandem edge serve`), each from the shipped
config with a few fields changed."""

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tandem.subprocesses import Server, announced_server, free_port

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Cloud:
    server: Server
    metrics_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


def cloud_config(experts: set[str] | None = None, **fields: Any) -> dict[str, Any]:
    """cloud/cloud.yaml with free ports, only the tasks whose expert is in `experts`
    (all by default), replicas logging warnings and errors only (a measured run's console
    is for its report), and `fields` replaced."""
    cfg = yaml.safe_load((ROOT / "cloud" / "cloud.yaml").read_text())
    if experts is not None:
        cfg["tasks"] = {name: t for name, t in cfg["tasks"].items() if t["expert"] in experts}
        cfg["experts"] = [e for e in cfg["experts"] if e["name"] in experts]
    cfg.update(grpc_port=free_port(), http_port=free_port(), ray_metrics_port=free_port(), log_level="WARNING",
               access_log=False)
    cfg.update(fields)
    return cfg


@contextlib.contextmanager
def cloud(cfg: dict[str, Any]) -> Iterator[Cloud]:
    """`tandem cloud serve` with `cfg` until the block ends (SIGTERM)."""
    log.info("starting the cloud (Ray Serve + vLLM; it takes a minute or two)")
    with _config_file(cfg) as path, announced_server(
        ["-m", "tandem_cli", "cloud", "serve", "--config", str(path)], timeout_s=900, stop_timeout_s=120
    ) as server:
        yield Cloud(server, f"http://127.0.0.1:{cfg['ray_metrics_port']}/metrics")


def edge_config(task: str, student: Path, cloud_target: str | None, **fields: Any) -> dict[str, Any]:
    """edge/edge.yaml serving `student` for `task` on a free port, metrics off, escalating to
    `cloud_target` (None: edge only), with top-level `fields` merged in (dicts one level deep)."""
    cfg = yaml.safe_load((ROOT / "edge" / "edge.yaml").read_text())
    cfg.update(listen="127.0.0.1:0", metrics_port=None, tasks={task: str(student)})
    cfg["cloud"]["target"] = cloud_target
    if cloud_target is None:
        cfg["policy"] = {"mode": "edge_only"}
    for key, value in fields.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@contextlib.contextmanager
def edge_daemon(cfg: dict[str, Any]) -> Iterator[Server]:
    """`tandem edge serve` with `cfg` until the block ends (SIGTERM)."""
    with _config_file(cfg) as path, announced_server(["-m", "tandem_cli", "edge", "serve", "--config", str(path)]) as server:
        yield server


@contextlib.contextmanager
def _config_file(cfg: dict[str, Any]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tandem-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        yield path
