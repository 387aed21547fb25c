"""The fleet's certificate authority: one CA signs the cloud proxy's server certificate and a
client certificate per device, whose common name is the device id the cloud trusts.

Files under `ca_dir` (ECDSA P-256 keys, written with `cryptography`'s x509, no openssl CLI):
`ca.key` (0600), `ca.crt`, `crl.pem`, `index.json` (every certificate issued per device, and
the revoked serials), `server.key` (0600), `server.crt`, and per device `devices/<id>/`
with `device.key` (0600), `device.crt` and a copy of `ca.crt`: that one folder is all an
edge needs (its `cloud.tls`).

Certificates expire: the CA after CA_DAYS, the server's after SERVER_DAYS (`init_ca` again
renews it), a device's after DEVICE_DAYS unless told otherwise (`enroll` again renews it).
The CRL expires too (CRL_DAYS): nginx then refuses every device, so re-issue it with
`write_crl` (`tandem ca crl`) well before; `check_ca` warns in its last EXPIRY_WARN_DAYS.
"""

import contextlib
import datetime
import fcntl
import ipaddress
import json
import logging
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tandem.contract import FieldError, check_name
from tandem.fsio import atomic_write
from tandem.settings import ConfigError

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 365
DEVICE_DAYS = 90
CRL_DAYS = 30
EXPIRY_WARN_DAYS = 7
CA_NAME = "Tandem fleet CA"  # plus a random suffix: two fleets' CAs never share a name
SERVER_NAME = "tandem-cloud"


class PKIError(ConfigError):
    """The CA is missing, expired or unusable (a setup step to do: the message says which), or
    a request to it is invalid."""


def init_ca(ca_dir: Path, hosts: Sequence[str] = (), days: int = SERVER_DAYS) -> list[Path]:
    """Creates the fleet CA in `ca_dir` (unless it exists: an existing CA is kept, so enrolled
    devices stay valid), then issues the server certificate for localhost, 127.0.0.1 and
    `hosts`, valid `days`, and the CRL. Running it again renews the server certificate or
    changes its host names. Returns the files written."""
    if days < 1:
        raise PKIError(f"days: {days} is below the minimum of 1")
    ca_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if not (ca_dir / "ca.key").exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME} {secrets.token_hex(4)}")])
        cert = (
            _builder(name, name, key.public_key(), CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_index(ca_dir, {"devices": {}, "revoked": {}})
        # The key last: its presence means the CA is whole (an interrupted init starts over).
        written += [_write_cert(ca_dir / "ca.crt", cert), _write_key(ca_dir / "ca.key", key)]
    ca_key, ca_cert = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _issued(ca_key, ca_cert, SERVER_NAME, key, days)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in ["localhost", "127.0.0.1", *hosts]]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    written += [_write_key(ca_dir / "server.key", key), _write_cert(ca_dir / "server.crt", cert)]
    return [*written, write_crl(ca_dir)]


def enroll(ca_dir: Path, device_id: str, days: int = DEVICE_DAYS, audit_uri: str | None = None) -> Path:
    """Issues device `device_id` a new key and client certificate valid `days`, in
    `ca_dir/devices/<id>/` with a copy of the CA certificate; returns that folder. Enrolling
    an enrolled device renews it (its older certificates stay valid until they expire or the
    device is revoked). Appends an `enroll` entry to the audit log at `audit_uri`, if given."""
    try:
        check_name("device id", device_id)
    except FieldError as exc:
        raise PKIError(str(exc)) from None
    if days < 1:
        raise PKIError(f"days: {days} is below the minimum of 1")
    ca_key, ca_cert = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _issued(ca_key, ca_cert, device_id, key, days)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = ca_dir / "devices" / device_id
    issued = {"serial": str(cert.serial_number), "not_after": cert.not_valid_after_utc.isoformat()}
    with _locked(ca_dir):
        _write_key(out / "device.key", key)
        _write_cert(out / "device.crt", cert)
        shutil.copyfile(ca_dir / "ca.crt", out / "ca.crt")
        index = _read_index(ca_dir)
        index["devices"].setdefault(device_id, []).append(issued)
        _write_index(ca_dir, index)
    if audit_uri:
        _audit(audit_uri, "enroll", device=device_id, **issued)
    return out


def revoke(ca_dir: Path, device_id: str, audit_uri: str | None = None) -> list[str]:
    """Revokes every certificate issued to `device_id` and re-issues the CRL, which a running
    proxy reloads within seconds (dropping the device's open connections). Returns the serials
    revoked now (empty if they already were). Appends a `revoke` entry to the audit log at
    `audit_uri`, if given. Enrolling the device again readmits it with a new certificate."""
    with _locked(ca_dir):
        index = _read_index(ca_dir)
        if device_id not in index["devices"]:
            raise PKIError(f"device {device_id!r} is not enrolled in {ca_dir}")
        now = _now().isoformat()
        serials = [c["serial"] for c in index["devices"][device_id] if c["serial"] not in index["revoked"]]
        for serial in serials:
            index["revoked"][serial] = {"device": device_id, "revoked_at": now}
        _write_index(ca_dir, index)
        _write_crl(ca_dir, CRL_DAYS)
    if audit_uri:
        _audit(audit_uri, "revoke", device=device_id, serials=serials)
    return serials


def write_crl(ca_dir: Path, days: int = CRL_DAYS) -> Path:
    """(Re-)issues `ca_dir/crl.pem`, listing every revoked serial, valid `days`. Past its
    nextUpdate nginx refuses every client certificate: run it (`tandem ca crl`) well within
    CRL_DAYS, e.g. weekly from cron."""
    with _locked(ca_dir):  # from the index as it is after any revocation in progress
        return _write_crl(ca_dir, days)


def _write_crl(ca_dir: Path, days: int) -> Path:
    ca_key, ca_cert = _load_ca(ca_dir)
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    for serial, entry in _read_index(ca_dir)["revoked"].items():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial))
            .revocation_date(datetime.datetime.fromisoformat(entry["revoked_at"]))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = ca_dir / "crl.pem"
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def check_ca(ca_dir: Path) -> None:
    """Raises PKIError, saying what to run, unless `ca_dir` holds what the proxy serves with
    and a CRL that has not expired; warns when the CRL or the server certificate expires
    within EXPIRY_WARN_DAYS."""
    missing = [n for n in ("ca.crt", "server.crt", "server.key", "crl.pem") if not (ca_dir / n).exists()]
    if missing:
        raise PKIError(f"no fleet CA in {ca_dir} (missing {', '.join(missing)}): run `tandem ca init --dir {ca_dir}`")
    now = _now()
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    server = x509.load_pem_x509_certificate((ca_dir / "server.crt").read_bytes())
    for what, expires, fix in ((f"the CRL {ca_dir / 'crl.pem'}", crl.next_update_utc, "tandem ca crl"),
                               (f"the server certificate {ca_dir / 'server.crt'}", server.not_valid_after_utc,
                                "tandem ca init")):
        if expires is None:  # a CRL without nextUpdate never expires
            continue
        if expires <= now:
            raise PKIError(f"{what} expired at {expires.isoformat()}: run `{fix} --dir {ca_dir}`")
        if expires - now < datetime.timedelta(days=EXPIRY_WARN_DAYS):
            log.warning("%s expires at %s: run `%s --dir %s`", what, expires.isoformat(), fix, ca_dir)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A minute back: a peer whose clock runs slightly behind still accepts a fresh certificate.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _issued(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
            key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """A leaf certificate signed by the CA whose subject is the common name alone (the proxy
    reads the device id from a subject that is exactly CN=<id>)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise PKIError(f"no fleet CA in {ca_dir}: run `tandem ca init --dir {ca_dir}`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{ca_dir / 'ca.key'} is not an EC key")
    return key, cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM))
    return path


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """One command at a time changes the index: two at once would lose an enrolment or,
    worse, a revocation."""
    if not (ca_dir / "index.json").exists():
        raise PKIError(f"no fleet CA in {ca_dir}: run `tandem ca init --dir {ca_dir}`")
    with open(ca_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_index(ca_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((ca_dir / "index.json").read_text())
    except FileNotFoundError:
        raise PKIError(f"no fleet CA in {ca_dir}: run `tandem ca init --dir {ca_dir}`") from None


def _write_index(ca_dir: Path, index: dict[str, Any]) -> None:
    atomic_write(ca_dir / "index.json", json.dumps(index, indent=2, sort_keys=True).encode())


def _audit(uri: str, event: str, **data: Any) -> None:
    from cloud.audit.log import AuditLog  # the audit log needs pyarrow; the CA alone does not

    AuditLog(uri).append(event, "ca", **data)
