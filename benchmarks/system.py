"""The system's parts as real processes, for the demo and the benchmarks: the cloud
(`tandem cloud serve`, behind its mTLS proxy) and edge daemons (`tandem edge serve`, each
enrolled with a device certificate of the cloud's fleet CA), each from the shipped config
with a few fields changed."""

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cloud import pki
from cloud.audit.log import audit_uri
from cloud.config import CloudConfig
from tandem.subprocesses import Server, announced_server, free_port

log = logging.getLogger(__name__)

CLOUD_START_TIMEOUT_S = 900

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class CloudFiles:
    """What a cloud process runs from, kept across restarts: its config file, and its fleet CA
    and proxy folder (None for an insecure cloud)."""

    config: Path
    port: int  # the edges' port: the TLS proxy's (Serve's own for an insecure cloud)
    metrics_url: str
    ca_dir: Path | None
    proxy_prefix: Path | None  # the TLS proxy's folder (its logs/access.log)
    audit_uri: str

    @property
    def target(self) -> str:
        """The edges' target."""
        return f"127.0.0.1:{self.port}"

    def link(self, device_id: str) -> dict[str, Any]:
        """The `cloud` section of an edge config for `device_id`, enrolled with the fleet CA."""
        if self.ca_dir is None:
            return {"target": self.target, "insecure": True}
        device = pki.enroll(self.ca_dir, device_id, audit_uri=self.audit_uri)
        return {"target": self.target, "tls": {"ca": str(device / "ca.crt"), "cert": str(device / "device.crt"),
                                               "key": str(device / "device.key")}}

    def serve_args(self) -> list[str]:
        return ["-m", "tandem_cli", "cloud", "serve", "--config", str(self.config)]


@dataclass(frozen=True)
class Cloud(CloudFiles):
    """A running cloud and the files it runs from."""

    server: Server


def cloud_config(experts: set[str] | None = None, **fields: Any) -> dict[str, Any]:
    """cloud/cloud.yaml with free ports, only the tasks whose expert is in `experts`
    (all by default), replicas logging warnings and errors only (a measured run's console
    is for its report), and `fields` replaced."""
    cfg = yaml.safe_load((ROOT / "cloud" / "cloud.yaml").read_text())
    for t in cfg["tasks"].values():  # the copy is written elsewhere: its task files by absolute path
        t["task"] = str((ROOT / "cloud" / t["task"]).resolve())
    if experts is not None:
        cfg["tasks"] = {name: t for name, t in cfg["tasks"].items() if t["expert"] in experts}
        cfg["experts"] = [e for e in cfg["experts"] if e["name"] in experts]
    cfg.update(grpc_port=free_port(), http_port=free_port(), ray_metrics_port=free_port(), log_level="WARNING",
               access_log=False, proxy={"port": free_port()})
    cfg.update(fields)
    return cfg


@contextlib.contextmanager
def cloud(cfg: dict[str, Any]) -> Iterator[Cloud]:
    """`tandem cloud serve` with `cfg` until the block ends (SIGTERM). Unless `cfg` says
    `insecure`, behind its TLS proxy, with a fleet CA of its own (`tandem ca init`) in a
    scratch folder that the block's edges enrol with (`Cloud.link`)."""
    log.info("starting the cloud (Ray Serve + vLLM behind the mTLS proxy; it takes a minute or two)")
    with tempfile.TemporaryDirectory(prefix="tandem-ca-") as tmp:
        files = cloud_files(cfg, Path(tmp))
        with announced_server(files.serve_args(), timeout_s=CLOUD_START_TIMEOUT_S, stop_timeout_s=120) as server:
            yield Cloud(server=server, **dataclasses.asdict(files))


def cloud_files(cfg: dict[str, Any], work: Path) -> CloudFiles:
    """Writes `cfg` as a config file in `work`; unless `cfg` says `insecure`, with a new fleet
    CA (`tandem ca init`) and the TLS proxy's folder there too."""
    secure = not cfg.get("insecure")
    ca_dir, prefix = (work / "ca", work / "proxy") if secure else (None, None)
    if secure:
        pki.init_ca(ca_dir)
        cfg = {**cfg, "proxy": {**cfg.get("proxy", {}), "ca_dir": str(ca_dir), "prefix": str(prefix)}}
    path = work / "cloud.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port = cfg["proxy"]["port"] if secure else cfg["grpc_port"]
    return CloudFiles(path, port, f"http://127.0.0.1:{cfg['ray_metrics_port']}/metrics", ca_dir, prefix,
                      audit_uri(cfg.get("feedback_uri") or CloudConfig.model_validate({}).feedback_uri))


def edge_config(task: str, student: Path, c: CloudFiles | None, device_id: str = "edge-1", **fields: Any) -> dict[str, Any]:
    """edge/edge.yaml serving `student` for `task` on a free port, metrics off, as `device_id`
    escalating to `c` (None: edge only), with top-level `fields` merged in (dicts one level deep)."""
    cfg = yaml.safe_load((ROOT / "edge" / "edge.yaml").read_text())
    cfg.update(listen="127.0.0.1:0", metrics_port=None, tasks={task: str(student)}, device_id=device_id)
    if c is None:
        cfg["cloud"] = {"target": None}
        cfg["policy"] = {"mode": "edge_only"}
    else:
        shipped = {k: v for k, v in cfg["cloud"].items() if k not in ("tls", "insecure")}
        cfg["cloud"] = {**shipped, **c.link(device_id)}
    for key, value in fields.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@contextlib.contextmanager
def edge_daemon(cfg: dict[str, Any]) -> Iterator[Server]:
    """`tandem edge serve` with `cfg` until the block ends (SIGTERM)."""
    with _config_file(cfg) as path, announced_server(edge_args(path)) as server:
        yield server


def edge_args(config: Path) -> list[str]:
    """`tandem edge serve` with the config file `config`, as arguments of `python`."""
    return ["-m", "tandem_cli", "edge", "serve", "--config", str(config)]


@contextlib.contextmanager
def _config_file(cfg: dict[str, Any]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tandem-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        yield path
