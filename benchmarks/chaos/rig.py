"""The system under test, wired for faults: the cloud and the edge daemons as processes that
the run kills and restarts from the same files, every edge reaching the cloud through the
fault-injecting proxy, one edge's outbox on a small disk, and each edge's metrics banked
across its restarts."""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.artifacts import signed_copy
from benchmarks.chaos.parts import Part, descendants, role, scrape, total
from benchmarks.system import CloudFiles, edge_args, edge_config
from cloud.registry.models import ModelRegistry
from tandem.signing import generate_key, load_private_key, public_path, trust
from tandem.subprocesses import free_port

log = logging.getLogger(__name__)

@dataclass
class Edge:
    name: str
    part: Part
    port: int
    metrics_url: str
    outbox_dir: Path
    models_dir: Path
    banked: list[dict[str, float]]  # the last metrics of each ended incarnation

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def counter(self, name: str, **labels: str) -> float:
        """`name` summed over this edge's incarnations, the live one included."""
        live = [self.metrics()] if self.part.server else []
        return sum(total(samples, name, **labels) for samples in [*self.banked, *live])

    def gauge(self, name: str) -> float:
        """`name` as the live incarnation reports it."""
        return total(self.metrics(), name)

    def bank(self) -> None:
        """Keeps the live incarnation's last metrics (before it is killed or stopped)."""
        self.banked.append(self.metrics())


class Rig:
    def __init__(self, files: CloudFiles, work: Path, task: str, student: Path) -> None:
        self.files = files
        self.work = work
        self.task = task
        self._student = student
        self.cloud = Part(files.serve_args(), start_timeout_s=900, stop_timeout_s=120)
        self.registry = ModelRegistry(Path(yaml.safe_load(files.config.read_text())["registry_dir"]))
        self.feedback_root = Path(yaml.safe_load(files.config.read_text())["feedback_uri"])
        self.key = work / "keys" / "signing.pem"
        self.keyring = work / "keyring.json"
        self.edges: dict[str, Edge] = {}

    def publish(self) -> str:
        """A new signed version of the student, promoted: the edges pull it at their next poll."""
        if not self.key.exists():
            generate_key(self.key)
            trust(self.keyring, public_path(self.key))
        sequence = self.registry.next_sequence(self.task)
        version = self.registry.publish(self.task, signed_copy(self._student, self.work / "versions" / str(sequence),
                                                               self.task, sequence, load_private_key(self.key)))
        self.registry.promote(self.task, version, load_private_key(self.key))
        return version

    def add_edge(self, name: str, cloud_target: str, outbox_dir: Path, **fields: Any) -> Edge:
        """An edge daemon's files: serving the promoted version, recording feedback into
        `outbox_dir`, pulling updates, reaching the cloud at `cloud_target`."""
        version = self.registry.promoted(self.task)
        if version is None:
            raise RuntimeError(f"no version of {self.task} is promoted: `publish` one before adding edges")
        promoted = self.registry.path(self.task, version)
        port, metrics_port = free_port(), free_port()
        models_dir = self.work / name / "models"
        cfg = edge_config(
            self.task, promoted, self.files, name, listen=f"127.0.0.1:{port}", metrics_port=metrics_port,
            cloud={"target": cloud_target},
            feedback={"outbox": str(outbox_dir / "outbox.sqlite3"), "audit_rate": 0.0, **fields.pop("feedback", {})},
            updater={"enabled": True, "poll_interval_s": 5.0, "models_dir": str(models_dir), "keyring": str(self.keyring)},
            **fields)
        path = self.work / name / "edge.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        edge = Edge(name, Part(edge_args(path)), port, f"http://127.0.0.1:{metrics_port}/metrics", outbox_dir,
                    models_dir, [])
        self.edges[name] = edge
        return edge

    def roles(self) -> dict[int, str]:
        """Pid -> role of the parts' own processes (the RSS sampler names the cloud's by command)."""
        return {e.part.pid: e.name for e in self.edges.values() if e.part.pid is not None}

    def replicas(self) -> dict[str, list[psutil.Process]]:
        """The cloud's Serve replica processes by application."""
        found: dict[str, list[psutil.Process]] = {}
        for proc in descendants(self.cloud.pid) if self.cloud.pid else []:
            with contextlib.suppress(psutil.NoSuchProcess):
                name = role(proc)
                if name.startswith("replica:"):
                    found.setdefault(name.removeprefix("replica:"), []).append(proc)
        return found

    async def start_edge(self, edge: Edge) -> float:
        await asyncio.to_thread(edge.part.start)
        return time.monotonic()

    def kill_edge(self, edge: Edge) -> None:
        edge.bank()
        edge.part.kill()

    def stop_edges(self) -> None:
        for edge in self.edges.values():
            if edge.part.server is not None:
                edge.bank()
                edge.part.stop()
