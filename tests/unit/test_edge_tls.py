"""How the edge reaches the cloud: mutual TLS with the device's files, plaintext only when
the config says `insecure`, nothing by default."""

import logging
from pathlib import Path

import pytest

from edge.cloud_client import open_channel
from edge.config import CloudLinkConfig, EdgeConfig
from tandem.settings import ConfigError, load_config


def _device_dir(tmp_path: Path) -> Path:
    for name in ("ca.crt", "device.crt", "device.key"):
        (tmp_path / name).write_text("PEM")
    return tmp_path


def _load(tmp_path: Path, cloud: str) -> EdgeConfig:
    path = tmp_path / "edge.yaml"
    path.write_text(f"tasks: {{t: /m}}\ncloud: {cloud}\n")
    return load_config(EdgeConfig, path)


def test_a_target_without_tls_or_insecure_is_refused_naming_cloud_tls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cloud.tls \(ca, cert, key.*cloud.insecure: true"):
        _load(tmp_path, "{target: 'cloud:9443'}")


def test_the_device_directory_maps_to_tls(tmp_path: Path) -> None:
    d = _device_dir(tmp_path)
    cfg = _load(tmp_path, f"{{target: 'cloud:9443', tls: {{ca: {d}/ca.crt, cert: {d}/device.crt, key: {d}/device.key}}}}")
    assert cfg.cloud.tls is not None and cfg.cloud.tls.cert == d / "device.crt" and not cfg.cloud.insecure


@pytest.mark.parametrize(("cloud", "message"), [
    ("{target: 'c:1', tls: {ca: D/ca.crt, cert: D/device.crt}}", r"cloud.tls.key(.|\n)*required"),
    ("{target: 'c:1', insecure: true, tls: {ca: D/ca.crt, cert: D/device.crt, key: D/device.key}}", "exclude each other"),
])
def test_incomplete_or_contradictory_tls_is_refused(tmp_path: Path, cloud: str, message: str) -> None:
    d = _device_dir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, cloud.replace("D/", f"{d}/"))


def test_no_target_needs_neither(tmp_path: Path) -> None:
    assert CloudLinkConfig().target is None


async def test_insecure_is_plaintext_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge.cloud_client"):
        channel = open_channel(CloudLinkConfig(target="127.0.0.1:1", insecure=True))
    await channel.close()
    assert any("cloud.insecure" in r.getMessage() and "plaintext" in r.getMessage() for r in caplog.records)


async def test_unreadable_tls_files_are_a_config_error_naming_the_file(tmp_path: Path) -> None:
    d = _device_dir(tmp_path)
    cfg = _load(tmp_path, f"{{target: 'c:1', tls: {{ca: {d}/ca.crt, cert: {d}/device.crt, key: {d}/device.key}}}}")
    (d / "device.key").unlink()  # gone between loading the config and starting
    with pytest.raises(ConfigError, match="cloud.tls.key: cannot read"):
        open_channel(cfg.cloud)


def test_listen_names_a_unix_socket_or_an_address() -> None:
    assert EdgeConfig(tasks={"t": Path("/m")}, policy={"mode": "edge_only"}).socket_path is None
    cfg = EdgeConfig(tasks={"t": Path("/m")}, policy={"mode": "edge_only"}, listen="unix:///run/tandem/edge.sock")
    assert cfg.socket_path == Path("/run/tandem/edge.sock") and cfg.socket_mode == "0660"
    with pytest.raises(ValueError, match="socket_mode"):
        EdgeConfig(tasks={"t": Path("/m")}, policy={"mode": "edge_only"}, socket_mode="0999")
