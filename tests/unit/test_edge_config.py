"""The edge config's defaults (the shipped DaemonSet's config: tests/unit/test_k8s.py)."""

from pathlib import Path

from edge.config import EdgeConfig
from tandem.settings import load_config


def test_metrics_bind_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\n")
    assert load_config(EdgeConfig, path).metrics_host == "127.0.0.1"
