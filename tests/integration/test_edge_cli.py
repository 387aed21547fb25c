"""`tandem edge serve` as a user runs it: a subprocess, its health, its metrics, its exit."""

import contextlib
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.subprocesses import Server, announced_server, free_port
from tandem.v1 import edge_pb2, edge_pb2_grpc

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, student_dir: Path, metrics_port: int, **extra: object) -> Path:
    path = tmp_path / "edge.yaml"
    cfg = {"listen": "127.0.0.1:0", "metrics_port": metrics_port, "tasks": {"banking77": str(student_dir)},
           "policy": {"mode": "edge_only"}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _serve(config: Path) -> contextlib.AbstractContextManager[Server]:
    return announced_server(["-m", "tandem_cli", "edge", "serve", "--config", str(config)])


def _infer(port: int, n: int) -> list[edge_pb2.InferResponse]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = edge_pb2_grpc.EdgeStub(channel)
        return [stub.Infer(edge_pb2.InferRequest(task="banking77", text=b"where is my new card"), timeout=5) for _ in range(n)]


def test_serve_answers_reports_health_and_metrics_and_exits_cleanly(student_dir: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    with _serve(_config(tmp_path, student_dir, metrics_port)) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Edge"), timeout=5)
        answers = _infer(server.port, 5)
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert {a.source for a in answers} == {edge_pb2.EDGE}
    assert 'tandem_edge_requests_total{source="EDGE",task="banking77"} 5.0' in exposition
    assert "tandem_edge_request_seconds_bucket" in exposition and 'le="0.00025"' in exposition
    assert server.process.returncode == 0, "SIGTERM must drain and exit 0"


def test_invalid_config_exits_2_naming_the_field(student_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, student_dir, 0, policy={"mode": "edge_only", "threshold": 2})
    done = subprocess.run([sys.executable, "-m", "tandem_cli", "edge", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "policy.threshold" in done.stderr and "less than or equal to 1" in done.stderr


def test_a_real_prometheus_scrapes_the_daemon(student_dir: Path, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "Prometheus is not installed: `make test` installs Debian's prometheus package"
    metrics_port, web_port = free_port(), free_port()
    scrape = {"global": {"scrape_interval": "1s"},
              "scrape_configs": [{"job_name": "tandem-edge", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    with _serve(_config(tmp_path, student_dir, metrics_port)) as server:
        _infer(server.port, 7)
        prometheus = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            value = _poll(web_port, 'sum(tandem_edge_requests_total{job="tandem-edge",source="EDGE"})', want="7")
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    assert value == "7"


def _poll(web_port: int, query: str, want: str, timeout_s: float = 60) -> str | None:
    """Queries Prometheus until the instant value equals `want` or time runs out."""
    url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    value = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and value != want:
        time.sleep(1)
        try:
            result = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
        except OSError:
            continue  # not listening yet
        value = result[0]["value"][1] if result else None
    return value
