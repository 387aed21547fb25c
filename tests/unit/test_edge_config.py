"""The edge config's robustness fields, and the shipped DaemonSet's metrics exposure."""

from pathlib import Path

import yaml

from edge.config import EdgeConfig
from tandem.settings import load_config

ROOT = Path(__file__).resolve().parents[2]


def _daemonset() -> tuple[dict, dict]:
    documents = list(yaml.safe_load_all((ROOT / "k8s/edge-daemonset.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    daemonset = next(d for d in documents if d["kind"] == "DaemonSet")
    return yaml.safe_load(config_map["data"]["edge.yaml"]), daemonset


def test_metrics_bind_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\n")
    assert load_config(EdgeConfig, path).metrics_host == "127.0.0.1"


def test_the_daemonset_exposes_the_metrics_port_it_advertises_for_scraping(tmp_path: Path) -> None:
    edge, daemonset = _daemonset()
    (tmp_path / "edge.yaml").write_text(yaml.safe_dump(edge))
    cfg = load_config(EdgeConfig, tmp_path / "edge.yaml")
    pod = daemonset["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert cfg.metrics_host == "0.0.0.0", "scraped by pod IP: loopback is unreachable"
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == cfg.metrics_port == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_liveness_and_readiness_ask_the_overall_service_not_the_loops() -> None:
    _, daemonset = _daemonset()
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"]["service"] == "tandem.v1.Edge"
