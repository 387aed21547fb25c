"""The real nginx TLS proxy (`cloud.proxy`) with a real fleet CA (`cloud.pki`) in front of a
small real gRPC server that echoes the metadata it receives."""

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import psutil
import pytest

from cloud import pki
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from cloud.proxy import TOKEN_PLACEHOLDER, ProxyOptions, running_proxy
from tandem.contract import MESSAGE_MAX_BYTES
from tandem.subprocesses import free_port
from tandem.v1 import fleet_pb2, fleet_pb2_grpc
from tandem_cli.main import main

pytestmark = pytest.mark.integration

TOKEN = "test-proxy-token"
CHUNKS = 3


class EchoFleet(fleet_pb2_grpc.FleetServicer):
    """GetRoutes answers the metadata it received; FetchModel streams CHUNKS chunks of 1 MiB."""

    def GetRoutes(self, request: fleet_pb2.GetRoutesRequest, context: grpc.ServicerContext) -> fleet_pb2.Routes:
        return fleet_pb2.Routes(applications=dict(context.invocation_metadata()))

    def FetchModel(self, request: fleet_pb2.FetchModelRequest, context: grpc.ServicerContext) -> Iterator[fleet_pb2.ModelChunk]:
        for _ in range(CHUNKS):
            yield fleet_pb2.ModelChunk(data=b"x" * (1 << 20))


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca = tmp_path_factory.mktemp("ca")
    pki.init_ca(ca)
    for device in ("dev-a", "dev-b", "dev-revoked"):
        pki.enroll(ca, device)
    return ca


@pytest.fixture(scope="module")
def proxy_port(ca_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # Over the proxy's limit, so that the test sees the proxy's refusal, not the server's.
    upstream = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 << 20)])
    fleet_pb2_grpc.add_FleetServicer_to_server(EchoFleet(), upstream)
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    options = ProxyOptions(port=free_port(), ca_dir=ca_dir, prefix=tmp_path_factory.mktemp("proxy"))
    try:
        with running_proxy(options, upstream_port, TOKEN) as port:
            yield port
    finally:
        upstream.stop(0)


def channel(port: int, device_dir: Path | None, ca: Path) -> grpc.Channel:
    """A channel to the proxy that trusts `ca` and presents `device_dir`'s certificate, if any."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca / "ca.crt").read_bytes(),
        private_key=(device_dir / "device.key").read_bytes() if device_dir else None,
        certificate_chain=(device_dir / "device.crt").read_bytes() if device_dir else None,
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def stub(port: int, device_dir: Path | None, ca: Path) -> fleet_pb2_grpc.FleetStub:
    return fleet_pb2_grpc.FleetStub(channel(port, device_dir, ca))


def routes(fleet: fleet_pb2_grpc.FleetStub, metadata: tuple[tuple[str, str], ...] = ()) -> dict[str, str]:
    return dict(fleet.GetRoutes(fleet_pb2.GetRoutesRequest(), metadata=metadata, timeout=5).applications)


def test_an_enrolled_device_gets_through_as_itself(proxy_port: int, ca_dir: Path) -> None:
    seen = routes(stub(proxy_port, ca_dir / "devices" / "dev-a", ca_dir), (("application", "fleet"),))
    assert seen[DEVICE_METADATA] == "dev-a"
    assert seen[PROXY_TOKEN_METADATA] == TOKEN
    assert seen["application"] == "fleet"  # the client's other metadata passes through


def test_client_sent_identity_headers_are_replaced(proxy_port: int, ca_dir: Path) -> None:
    forged = ((DEVICE_METADATA, "dev-b"), (PROXY_TOKEN_METADATA, "guessed"))
    seen = routes(stub(proxy_port, ca_dir / "devices" / "dev-a", ca_dir), forged)
    assert seen[DEVICE_METADATA] == "dev-a"
    assert seen[PROXY_TOKEN_METADATA] == TOKEN


def test_no_client_certificate_is_unauthenticated(proxy_port: int, ca_dir: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        routes(stub(proxy_port, None, ca_dir))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no valid device certificate (NONE)" in err.value.details()


def test_a_certificate_from_another_ca_is_refused(proxy_port: int, ca_dir: Path, tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    impostor = pki.enroll(tmp_path, "dev-a")
    with pytest.raises(grpc.RpcError) as err:
        routes(stub(proxy_port, impostor, ca_dir))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "FAILED:unable to verify the first certificate" in err.value.details()


def test_a_revoked_device_is_refused_after_the_crl_reloads(proxy_port: int, ca_dir: Path) -> None:
    revoked = stub(proxy_port, ca_dir / "devices" / "dev-revoked", ca_dir)
    assert routes(revoked)[DEVICE_METADATA] == "dev-revoked"  # its connection is open when revoked
    pki.revoke(ca_dir, "dev-revoked")
    deadline = time.monotonic() + 10
    while True:
        try:
            routes(revoked)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                assert "certificate revoked" in exc.details()
                break
        assert time.monotonic() < deadline, "the revoked certificate still got through after 10 s"
        time.sleep(0.2)
    assert routes(stub(proxy_port, ca_dir / "devices" / "dev-b", ca_dir))[DEVICE_METADATA] == "dev-b"


def test_the_message_size_limit(proxy_port: int, ca_dir: Path) -> None:
    call = channel(proxy_port, ca_dir / "devices" / "dev-a", ca_dir).unary_unary("/tandem.v1.Fleet/GetRoutes")

    def padded(size: int) -> bytes:
        """A GetRoutesRequest of exactly `size` bytes: one unknown bytes field (number 15)."""
        length = size - 5  # tag byte + 4-byte varint length
        varint = bytes([(length >> s & 0x7F) | (0x80 if s < 21 else 0) for s in (0, 7, 14, 21)])
        return b"\x7a" + varint + b"x" * length

    assert call(padded(MESSAGE_MAX_BYTES), timeout=10)  # the largest message Serve takes passes
    with pytest.raises(grpc.RpcError) as err:
        call(padded(MESSAGE_MAX_BYTES + 1), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MESSAGE_MAX_BYTES + 5) in err.value.details()


def test_a_stream_passes_through(proxy_port: int, ca_dir: Path) -> None:
    fleet = stub(proxy_port, ca_dir / "devices" / "dev-a", ca_dir)
    chunks = list(fleet.FetchModel(fleet_pb2.FetchModelRequest(), timeout=10))
    assert [len(c.data) for c in chunks] == [1 << 20] * CHUNKS


def test_the_proxy_stops_whole_and_reports_a_failed_start(ca_dir: Path, tmp_path: Path) -> None:
    options = ProxyOptions(port=free_port(), ca_dir=ca_dir, prefix=tmp_path / "proxy")
    with running_proxy(options, free_port(), TOKEN):
        master = int((tmp_path / "proxy" / "nginx.pid").read_text())
        workers = psutil.Process(master).children()
        assert workers
        # A second proxy on the same port fails at once, saying why.
        with pytest.raises(RuntimeError, match="exited .*Address already in use"):
            with running_proxy(options.model_copy(update={"prefix": tmp_path / "second"}), free_port(), TOKEN):
                pass
    assert not any(p.is_running() for p in workers)
    assert not psutil.pid_exists(master)


def test_the_proxy_stops_when_its_owner_is_killed(ca_dir: Path, tmp_path: Path) -> None:
    """SIGKILL of the process running the proxy (a cloud killed whole) ends nginx too: its
    port is free for the next cloud."""
    port = free_port()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(port), str(ca_dir), str(tmp_path / "proxy"), TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        master = psutil.Process(int((tmp_path / "proxy" / "nginx.pid").read_text()))
        procs = [master, *master.children()]
    finally:
        owner.kill()
        owner.wait()
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive


# Runs the proxy until killed.
OWNER = """
import sys, time
from pathlib import Path
from cloud.proxy import ProxyOptions, running_proxy
from tandem.subprocesses import free_port
options = ProxyOptions(port=int(sys.argv[1]), ca_dir=Path(sys.argv[2]), prefix=Path(sys.argv[3]))
with running_proxy(options, free_port(), sys.argv[4]):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_proxy_config_renders_a_valid_conf_with_the_token_left_to_the_deployment(
        ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(f"grpc_port: 9100\nproxy: {{host: 0.0.0.0, ca_dir: {ca_dir}, prefix: {tmp_path}}}\n")
    assert main(["cloud", "proxy-config", "--config", str(config)]) == 0
    conf = capsys.readouterr().out
    assert TOKEN_PLACEHOLDER in conf and "server 127.0.0.1:9100;" in conf and "listen 0.0.0.0:9443 ssl http2;" in conf
    # What the deployment's envsubst does before nginx starts.
    (tmp_path / "nginx.conf").write_text(conf.replace(TOKEN_PLACEHOLDER, "a-secret-token-from-the-env"))
    (tmp_path / "logs").mkdir()
    check = subprocess.run(["/usr/sbin/nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "logs" / "error.log"),
                            "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
