"""The edge config's defaults (the shipped DaemonSet's config: tests/unit/test_k8s.py)."""

from pathlib import Path

import pytest

from edge.config import EdgeConfig
from tandem.settings import ConfigError, load_config


def test_metrics_bind_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\n")
    assert load_config(EdgeConfig, path).metrics_host == "127.0.0.1"


def test_policy_threshold_is_the_students_unless_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\n")
    assert load_config(EdgeConfig, path).policy.threshold is None
    monkeypatch.setenv("TANDEM_EDGE_POLICY__THRESHOLD", "0.7")  # pinned, as the shipped configs say
    assert load_config(EdgeConfig, path).policy.threshold == 0.7


def test_audit_sampling_is_weighted_toward_unsure_answers_by_default(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\n")
    assert load_config(EdgeConfig, path).feedback.audit_weighting == "margin"
    path.write_text("tasks: {t: /m}\npolicy: {mode: edge_only}\nfeedback: {audit_weighting: random}\n")
    with pytest.raises(ConfigError, match="audit_weighting"):
        load_config(EdgeConfig, path)


def test_risk_mode_needs_epsilon_and_a_cloud(tmp_path: Path) -> None:
    path = tmp_path / "edge.yaml"
    path.write_text("tasks: {t: /m}\ncloud: {target: 'c:1', insecure: true}\npolicy: {mode: risk}\n")
    with pytest.raises(ConfigError, match="policy.epsilon"):
        load_config(EdgeConfig, path)
    path.write_text("tasks: {t: /m}\npolicy: {mode: risk, epsilon: 0.05}\n")
    with pytest.raises(ConfigError, match="cloud.target"):
        load_config(EdgeConfig, path)
