"""The head pod's TLS proxy sidecar as k8s/ ships it: k8s/tls-proxy/run-proxy.sh with the shipped
nginx.conf template, on a real nginx with a real fleet CA (`cloud.pki`), in front of a small gRPC
server that echoes the metadata it receives. Only the pod's paths and ports are moved into the
test's folders."""

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cloud import pki
from cloud.config import CloudConfig
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from tandem.settings import load_config
from tandem.subprocesses import free_port
from tandem.v1 import fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "k8s-proxy-token-0123456789"
PKI_FILES = ("server.crt", "server.key", "ca.crt", "crl.pem")  # the tandem-proxy-pki Secret


class EchoFleet(fleet_pb2_grpc.FleetServicer):
    def GetRoutes(self, request: fleet_pb2.GetRoutesRequest, context: grpc.ServicerContext) -> fleet_pb2.Routes:
        return fleet_pb2.Routes(applications=dict(context.invocation_metadata()))


def publish(ca_dir: Path, secret_dir: Path) -> None:
    """What kubelet does when the Secret changes: the mounted files are replaced."""
    for name in PKI_FILES:
        shutil.copy(ca_dir / name, secret_dir / f".{name}")
        os.replace(secret_dir / f".{name}", secret_dir / name)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("ca")
    pki.init_ca(ca)
    for device in ("node-a", "node-revoked"):
        pki.enroll(ca, device)
    return ca


@pytest.fixture(scope="module")
def proxy(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The sidecar's TLS port, and the folder standing in for the mounted PKI Secret."""
    cloud = load_config(CloudConfig, ROOT / "cloud/cloud.prod.yaml")
    upstream = grpc.server(futures.ThreadPoolExecutor(2))
    fleet_pb2_grpc.add_FleetServicer_to_server(EchoFleet(), upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    work = tmp_path_factory.mktemp("sidecar")
    config_dir, prefix, secret_dir = work / "config", work / "run", work / "pki"
    for folder in (config_dir, prefix, secret_dir):
        folder.mkdir()
    publish(ca_dir, secret_dir)
    port = free_port()
    template = (ROOT / "k8s/tls-proxy/nginx.conf.template").read_text()
    for pod_value, here in ((str(cloud.proxy.prefix), str(prefix)), (str(cloud.proxy.ca_dir), str(secret_dir)),
                            (f"listen {cloud.proxy.host}:{cloud.proxy.port} ", f"listen 127.0.0.1:{port} "),
                            (f"server 127.0.0.1:{cloud.grpc_port};", f"server 127.0.0.1:{upstream_port};")):
        assert pod_value in template
        template = template.replace(pod_value, here)
    (config_dir / "nginx.conf.template").write_text(template)
    shutil.copy(ROOT / "k8s/tls-proxy/run-proxy.sh", config_dir)
    env = {**os.environ, "TANDEM_PROXY_TOKEN": TOKEN, "TANDEM_PROXY_PREFIX": str(prefix),
           "TANDEM_PROXY_PKI": str(secret_dir), "TANDEM_PROXY_POLL_S": "0.2",
           "PATH": f"{cloud.proxy.nginx.parent}:{os.environ['PATH']}"}
    sidecar = subprocess.Popen(["/bin/sh", str(config_dir / "run-proxy.sh")], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, process_group=0)
    try:
        wait_for(lambda: sidecar.poll() is None and (prefix / "nginx.pid").exists(), "nginx to start")
        yield port, secret_dir
    finally:
        sidecar.send_signal(signal.SIGTERM)  # what kubelet sends: nginx stops gracefully
        try:
            assert sidecar.wait(timeout=15) == 0
        finally:
            if sidecar.poll() is None:
                os.killpg(sidecar.pid, signal.SIGKILL)
            upstream.stop(0)


def wait_for(condition, what: str, timeout_s: float = 10) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def routes(port: int, ca_dir: Path, device: str | None) -> dict[str, str]:
    device_dir = ca_dir / "devices" / device if device else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca_dir / "ca.crt").read_bytes(),
        private_key=(device_dir / "device.key").read_bytes() if device_dir else None,
        certificate_chain=(device_dir / "device.crt").read_bytes() if device_dir else None,
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        fleet = fleet_pb2_grpc.FleetStub(channel)
        return dict(fleet.GetRoutes(fleet_pb2.GetRoutesRequest(), timeout=5).applications)


def unauthenticated(port: int, ca_dir: Path, device: str | None) -> bool:
    try:
        routes(port, ca_dir, device)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_the_token_comes_from_the_environment_and_the_device_from_its_certificate(
        proxy: tuple[int, Path], ca_dir: Path) -> None:
    port, _ = proxy
    wait_for(lambda: not unauthenticated(port, ca_dir, "node-a"), "the proxy to accept")
    seen = routes(port, ca_dir, "node-a")
    assert seen[DEVICE_METADATA] == "node-a" and seen[PROXY_TOKEN_METADATA] == TOKEN
    assert unauthenticated(port, ca_dir, None)


def test_a_revocation_reaches_the_running_sidecar_through_the_secret(proxy: tuple[int, Path], ca_dir: Path) -> None:
    port, secret_dir = proxy
    assert routes(port, ca_dir, "node-revoked")[DEVICE_METADATA] == "node-revoked"
    pki.revoke(ca_dir, "node-revoked")
    publish(ca_dir, secret_dir)
    wait_for(lambda: unauthenticated(port, ca_dir, "node-revoked"), "the revocation to take effect")
    assert routes(port, ca_dir, "node-a")[DEVICE_METADATA] == "node-a"


def test_the_sidecar_refuses_to_start_without_the_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_PROXY_TOKEN"}
    result = subprocess.run(["/bin/sh", str(ROOT / "k8s/tls-proxy/run-proxy.sh")], env=env, capture_output=True,
                            text=True, timeout=10)
    assert result.returncode != 0 and "TANDEM_PROXY_TOKEN" in result.stderr
