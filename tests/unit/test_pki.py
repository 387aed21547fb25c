"""The fleet CA (`cloud.pki`): what it writes, that the certificates chain and expire, that a
revocation lands in the CRL, and that device ids are checked."""

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from cloud import pki


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl(ca: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())


def days_left(c: x509.Certificate) -> float:
    return (c.not_valid_after_utc - now()) / datetime.timedelta(days=1)


@pytest.fixture()
def ca(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca", hosts=["cloud.example.com", "10.0.0.7"])
    return tmp_path / "ca"


def test_init_writes_the_ca_the_server_certificate_and_the_crl(ca: Path) -> None:
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((ca / name).stat().st_mode) == 0o600
    root = cert(ca / "ca.crt")
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 3640 < days_left(root) <= pki.CA_DAYS
    server = cert(ca / "server.crt")
    assert 360 < days_left(server) <= pki.SERVER_DAYS
    # RFC 5280 path validation of the server certificate for each of its names.
    verifier = PolicyBuilder().store(Store([root])).time(now())
    for name in (x509.DNSName("localhost"), x509.DNSName("cloud.example.com"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))):
        assert verifier.build_server_verifier(name).verify(server, [])[-1] == root
    assert crl(ca).is_signature_valid(root.public_key())
    assert len(crl(ca)) == 0


def test_init_again_keeps_the_ca_and_renews_the_server_certificate(ca: Path) -> None:
    root, server = (ca / "ca.crt").read_bytes(), cert(ca / "server.crt")
    device = pki.enroll(ca, "kiosk-1")
    pki.init_ca(ca, hosts=["other.example.com"])
    assert (ca / "ca.crt").read_bytes() == root
    assert cert(ca / "server.crt").serial_number != server.serial_number
    cert(device / "device.crt").verify_directly_issued_by(cert(ca / "ca.crt"))  # the CA is the same


def test_enroll_issues_a_client_certificate_named_after_the_device(ca: Path) -> None:
    device = pki.enroll(ca, "kiosk-1.branch_7")
    assert device == ca / "devices" / "kiosk-1.branch_7"
    assert stat.S_IMODE((device / "device.key").stat().st_mode) == 0o600
    assert (device / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    leaf = cert(device / "device.crt")
    assert leaf.subject.rfc4514_string() == "CN=kiosk-1.branch_7"  # exactly what the proxy maps
    assert 89 < days_left(leaf) <= pki.DEVICE_DAYS
    assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    leaf.verify_directly_issued_by(cert(ca / "ca.crt"))


def test_certificates_expire(ca: Path) -> None:
    leaf = cert(pki.enroll(ca, "kiosk-1", days=7) / "device.crt")
    assert 6 < days_left(leaf) <= 7
    with pytest.raises(pki.PKIError, match="days"):
        pki.enroll(ca, "kiosk-1", days=0)


def test_enroll_again_renews_with_a_new_key_and_serial(ca: Path) -> None:
    first = cert(pki.enroll(ca, "kiosk-1") / "device.crt")
    key = (ca / "devices" / "kiosk-1" / "device.key").read_bytes()
    second = cert(pki.enroll(ca, "kiosk-1") / "device.crt")
    assert second.serial_number != first.serial_number
    assert (ca / "devices" / "kiosk-1" / "device.key").read_bytes() != key


def test_revoke_lists_every_certificate_of_the_device_in_the_crl(ca: Path) -> None:
    old = cert(pki.enroll(ca, "kiosk-1") / "device.crt").serial_number
    new = cert(pki.enroll(ca, "kiosk-1") / "device.crt").serial_number
    other = cert(pki.enroll(ca, "kiosk-2") / "device.crt").serial_number
    assert sorted(pki.revoke(ca, "kiosk-1")) == sorted([str(old), str(new)])
    revoked = crl(ca)
    assert revoked.is_signature_valid(cert(ca / "ca.crt").public_key())
    assert {r.serial_number for r in revoked} == {old, new}
    assert revoked.get_revoked_certificate_by_serial_number(other) is None
    assert revoked.next_update_utc is not None
    assert 29 < (revoked.next_update_utc - now()) / datetime.timedelta(days=1) <= pki.CRL_DAYS
    assert pki.revoke(ca, "kiosk-1") == []  # already revoked
    # Readmitted with a new certificate, which the CRL does not list.
    readmitted = cert(pki.enroll(ca, "kiosk-1") / "device.crt").serial_number
    pki.write_crl(ca)
    assert crl(ca).get_revoked_certificate_by_serial_number(readmitted) is None
    assert {r.serial_number for r in crl(ca)} == {old, new}


def test_revoking_an_unknown_device_is_an_error(ca: Path) -> None:
    with pytest.raises(pki.PKIError, match="'ghost' is not enrolled"):
        pki.revoke(ca, "ghost")


@pytest.mark.parametrize("device", ["", "-x", ".x", "a b", "../etc", "a/b", "CN=x", "k" * 129, "kiosk\n"])
def test_bad_device_ids_are_refused(ca: Path, device: str) -> None:
    with pytest.raises(pki.PKIError, match="device id"):
        pki.enroll(ca, device)
    assert not (ca / "devices").exists()


def test_without_a_ca_every_command_says_to_run_init(tmp_path: Path) -> None:
    for call in (lambda: pki.enroll(tmp_path, "kiosk-1"), lambda: pki.revoke(tmp_path, "kiosk-1"),
                 lambda: pki.write_crl(tmp_path), lambda: pki.check_ca(tmp_path)):
        with pytest.raises(pki.PKIError, match="tandem ca init"):
            call()


def test_check_ca_refuses_an_expired_crl(ca: Path) -> None:
    pki.check_ca(ca)
    pki.write_crl(ca, days=0)
    with pytest.raises(pki.PKIError, match="CRL .* expired .*tandem ca crl"):
        pki.check_ca(ca)


def test_enroll_and_revoke_are_audited(ca: Path, tmp_path: Path) -> None:
    log = pytest.importorskip("cloud.audit.log")
    uri = str(tmp_path / "audit")
    serial = str(cert(pki.enroll(ca, "kiosk-1", audit_uri=uri) / "device.crt").serial_number)
    pki.revoke(ca, "kiosk-1", audit_uri=uri)
    entries = log.AuditLog(uri).entries()
    assert [(e["event"], e["actor"]) for e in entries] == [("enroll", "ca"), ("revoke", "ca")]
    assert entries[0]["data"]["device"] == "kiosk-1" and entries[0]["data"]["serial"] == serial
    assert entries[1]["data"] == {"device": "kiosk-1", "serials": [serial]}
    assert log.AuditLog(uri).verify() == 2


def test_the_ca_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandem_cli.main import main

    ca, audit = str(tmp_path / "ca"), str(tmp_path / "audit")
    assert main(["ca", "init", "--dir", ca, "--host", "cloud.example.com"]) == 0
    assert main(["ca", "enroll", "kiosk-1", "--dir", ca, "--days", "30", "--audit-uri", audit]) == 0
    out = capsys.readouterr().out
    assert f"{ca}/devices/kiosk-1/device.crt" in out and "cloud.tls:" in out
    assert 29 < days_left(cert(tmp_path / "ca" / "devices" / "kiosk-1" / "device.crt")) <= 30
    assert main(["ca", "enroll", "kiosk-1", "--dir", ca, "--days", "0", "--audit-uri", audit]) == 2
    assert "days: 0" in capsys.readouterr().err
    assert main(["ca", "revoke", "kiosk-1", "--dir", ca, "--audit-uri", audit]) == 0
    assert len(crl(tmp_path / "ca")) == 1
    assert main(["ca", "crl", "--dir", ca]) == 0
    assert len(crl(tmp_path / "ca")) == 1
    assert main(["ca", "revoke", "kiosk-2", "--dir", ca, "--audit-uri", audit]) == 2
    assert "not enrolled" in capsys.readouterr().err
