from pathlib import Path

import pytest

from edge.config import EdgeConfig
from tandem.settings import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.yaml"
    path.write_text(text)
    return path


def test_yaml_is_loaded_and_environment_overrides_nested_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "tasks: {t: ~/models/t}\ncloud: {target: 'cloud:9000', insecure: true}\npolicy: {threshold: 0.4}\n")
    monkeypatch.setenv("TANDEM_EDGE_POLICY__THRESHOLD", "0.75")
    monkeypatch.setenv("TANDEM_EDGE_MAX_BATCH", "4")
    cfg = load_config(EdgeConfig, path)
    assert cfg.policy.threshold == 0.75
    assert cfg.max_batch == 4
    assert cfg.cloud.target == "cloud:9000"
    assert cfg.tasks["t"] == Path.home() / "models/t"


def test_invalid_value_names_the_field_and_the_limit(tmp_path: Path) -> None:
    path = _write(tmp_path, "tasks: {t: /m}\npolicy: {mode: edge_only, threshold: 1.5}\n")
    with pytest.raises(ConfigError, match=r"policy\.threshold(.|\n)*less than or equal to 1"):
        load_config(EdgeConfig, path)


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="treshold"):
        load_config(EdgeConfig, _write(tmp_path, "tasks: {t: /m}\ntreshold: 0.5\n"))


def test_escalating_policy_without_a_cloud_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cloud.target is required"):
        load_config(EdgeConfig, _write(tmp_path, "tasks: {t: /m}\npolicy: {mode: threshold}\n"))


def test_missing_file_and_non_mapping_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(EdgeConfig, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(EdgeConfig, _write(tmp_path, "- a\n- b\n"))
