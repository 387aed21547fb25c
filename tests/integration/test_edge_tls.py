"""The edge escalating over mutual TLS to a real grpc.aio TLS server that requires a client
certificate, with a CA and certificates made here (cryptography's x509)."""

import contextlib
import datetime
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.cloud_client import CloudClient
from edge.config import CloudLinkConfig, TLSFiles
from edge.errors import CloudCallError
from tandem.settings import ConfigError
from tandem.v1 import expert_pb2, expert_pb2_grpc, fleet_pb2_grpc

from .conftest import ScriptedCloud

pytestmark = pytest.mark.integration


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(
    subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, ca: bool = False,
    hosts: tuple[str, ...] = (), days: int = 90,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate for `subject`, signed by `issuer` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        import ipaddress

        names = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def make_pki(directory: Path, device: str = "edge-1", days: int = 90) -> tuple[dict[str, bytes], TLSFiles]:
    """A CA, a server certificate for localhost/127.0.0.1 and a device directory laid out like
    `tandem ca enroll`'s. Returns the server's PEMs (ca, cert, key) and the device's TLSFiles."""
    ca_cert, ca_key = _issue("tandem test CA", None, ca=True)
    ca = (ca_cert.subject, ca_key)
    server_cert, server_key = _issue("tandem-cloud", ca, hosts=("localhost", "127.0.0.1"))
    device_cert, device_key = _issue(device, ca, days=days)
    pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(pem(ca_cert))
    (directory / "device.crt").write_bytes(pem(device_cert))
    (directory / "device.key").write_bytes(_pem_key(device_key))
    files = TLSFiles(ca=directory / "ca.crt", cert=directory / "device.crt", key=directory / "device.key")
    return {"ca": pem(ca_cert), "cert": pem(server_cert), "key": _pem_key(server_key)}, files


@contextlib.asynccontextmanager
async def tls_cloud(server_pem: dict[str, bytes]) -> AsyncIterator[tuple[ScriptedCloud, str, list[str]]]:
    """A scripted cloud behind TLS that requires a client certificate from the CA; yields it,
    its address and the common names of the clients it saw."""
    servicer = ScriptedCloud()
    seen: list[str] = []
    escalate = servicer.Escalate

    async def remembering(request: expert_pb2.EscalateRequest, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        seen.extend(name.decode() for name in context.auth_context().get("x509_common_name", []))
        return await escalate(request, context)

    servicer.Escalate = remembering  # type: ignore[method-assign]
    server = grpc.aio.server()
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, server)
    fleet_pb2_grpc.add_FleetServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(server_pem["key"], server_pem["cert"])], root_certificates=server_pem["ca"], require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}", seen
    finally:
        await server.stop(0)


REQUEST = expert_pb2.EscalateRequest(request_id="r-1", task="banking77", text="where is my card", device_id="edge-1")


async def test_escalates_over_mutual_tls_with_the_device_certificate(tmp_path: Path) -> None:
    server_pem, device = make_pki(tmp_path / "edge-1")
    async with tls_cloud(server_pem) as (servicer, target, seen):
        client = CloudClient(CloudLinkConfig(target=target, tls=device), device_id="edge-1")
        try:
            first = await client.escalate(REQUEST)
            second = await client.escalate(REQUEST)
        finally:
            await client.close()
    assert first.label == second.label == "card_arrival"
    assert seen == ["edge-1", "edge-1"], "the server saw the device certificate's CN on every call"
    assert len(servicer.routes_asked) == 1


async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    server_pem, _ = make_pki(tmp_path / "fleet")
    _, stranger = make_pki(tmp_path / "stranger")
    async with tls_cloud(server_pem) as (servicer, target, _):
        client = CloudClient(CloudLinkConfig(target=target, tls=stranger, deadline_ms=1000))
        try:
            with pytest.raises(CloudCallError) as info:
                await client.escalate(REQUEST)
        finally:
            await client.close()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and not servicer.seen


async def test_plaintext_to_a_tls_cloud_gets_no_answer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server_pem, _ = make_pki(tmp_path / "edge-1")
    async with tls_cloud(server_pem) as (servicer, target, _):
        client = CloudClient(CloudLinkConfig(target=target, insecure=True, deadline_ms=1000))
        try:
            with pytest.raises(CloudCallError):
                await client.escalate(REQUEST)
        finally:
            await client.close()
    assert not servicer.seen
    assert any(r.levelname == "WARNING" and "cloud.insecure" in r.getMessage() for r in caplog.records)


def test_a_certificate_of_another_device_stops_the_start(tmp_path: Path) -> None:
    _, device = make_pki(tmp_path / "edge-2", device="edge-2")
    with pytest.raises(ConfigError, match="certificate of 'edge-2', not of device_id 'edge-1'"):
        CloudClient(CloudLinkConfig(target="127.0.0.1:1", tls=device), device_id="edge-1")


async def test_a_certificate_near_expiry_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, device = make_pki(tmp_path / "edge-1", days=3)
    await CloudClient(CloudLinkConfig(target="127.0.0.1:1", tls=device), device_id="edge-1").close()
    assert any(r.levelname == "ERROR" and "expires" in r.getMessage() and "renew" in r.getMessage() for r in caplog.records)


async def test_a_device_directory_from_the_fleet_ca_is_all_the_edge_needs(tmp_path: Path) -> None:
    from cloud import pki

    ca_dir = tmp_path / "ca"
    pki.init_ca(ca_dir)
    device_dir = pki.enroll(ca_dir, "kiosk-7")
    server_pem = {"ca": (ca_dir / "ca.crt").read_bytes(), "cert": (ca_dir / "server.crt").read_bytes(),
                  "key": (ca_dir / "server.key").read_bytes()}
    tls = TLSFiles(ca=device_dir / "ca.crt", cert=device_dir / "device.crt", key=device_dir / "device.key")
    async with tls_cloud(server_pem) as (_, target, seen):
        client = CloudClient(CloudLinkConfig(target=target, tls=tls), device_id="kiosk-7")
        try:
            assert (await client.escalate(REQUEST)).label == "card_arrival"
        finally:
            await client.close()
    assert seen == ["kiosk-7"]
