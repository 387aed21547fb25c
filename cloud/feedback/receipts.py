"""Escalation receipts: the expert's record of an answer, signed for the device to keep.

The cloud records no escalation itself (a replica's memory is lost with the replica, and an
answer the edge gave up on would be stored beside the edge's FALLBACK record). The expert
answers each escalation with a receipt instead: the ESCALATION FeedbackRecord it would have
stored, serialized, and an HMAC-SHA256 of those bytes under a key only the cloud holds. The
edge commits the receipt to its durable outbox before it answers its caller, and delivers it
with its other feedback; the fleet checks the MAC over the bytes before it parses them, then
stores the record inside. A device can neither forge nor alter a teacher label, and a request
is recorded once: as ESCALATION if the edge got the answer, else as its FALLBACK.

One key (`CloudConfig.receipt_key`), read once when a deployment starts; `key_id`, a short
hash of it, names it in each receipt. A receipt signed under another key (the file replaced)
is refused: there is no rotation with an overlap, so a new key leaves the receipts edges
still hold undeliverable (their edges move them to the outbox's dead table).
"""

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from cloud.errors import PermissionDenied
from tandem.v1 import common_pb2, expert_pb2, fleet_pb2

KEY_BYTES = 32


@dataclass(frozen=True)
class ReceiptKey:
    """The cloud's receipt key; `key_id` names it without revealing it."""

    secret: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:16]


def create_key(path: Path) -> bool:
    """Writes a random key to `path` (mode 0600) unless a file is there; whether it wrote one.
    Kept across restarts: edges hold receipts for as long as the cloud is away."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(KEY_BYTES))
        f.flush()
        os.fsync(f.fileno())
    return True


def load_key(path: Path) -> ReceiptKey:
    """The key in the file at `path`; ValueError, naming the file, if it is missing or short."""
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the receipt key {path} (receipt_key): {exc}; `tandem cloud serve` creates it "
                         f"(in Kubernetes, a Secret)") from exc
    if len(secret) < KEY_BYTES:
        raise ValueError(f"the receipt key {path} (receipt_key) holds {len(secret)} bytes, fewer than {KEY_BYTES}")
    return ReceiptKey(secret)


def escalation_record(request: expert_pb2.EscalateRequest, response: expert_pb2.EscalateResponse,
                      answered_unix_ms: int) -> fleet_pb2.FeedbackRecord:
    """What the cloud keeps of an escalation it answered; `request.device_id` is the verified
    caller. Its id, `esc/<device>/<hash of the request id>`: an escalation delivered twice is
    stored once, two devices that both number their requests 1, 2, ... do not collide, any
    request id makes a valid record id, and no device can claim it first, since the ids of
    the records devices send are all under `dev/<device>/`."""
    key = hashlib.sha256(request.request_id.encode()).hexdigest()[:32]
    return fleet_pb2.FeedbackRecord(
        record_id=f"esc/{request.device_id}/{key}",
        request_id=request.request_id,
        task=request.task,
        kind=fleet_pb2.ESCALATION,
        text=request.text,
        edge=request.edge,
        label=response.label,
        distribution=response.distribution,
        expert=response.expert,
        device_id=request.device_id,
        created_unix_ms=answered_unix_ms,
        label_set_version=response.label_set_version,
    )


def issue(record: fleet_pb2.FeedbackRecord, key: ReceiptKey) -> common_pb2.Receipt:
    """`record`, serialized, with its MAC under `key`."""
    data = record.SerializeToString()
    return common_pb2.Receipt(record=data, mac=_mac(key, data), key_id=key.key_id)


def verify(receipt: common_pb2.Receipt, key: ReceiptKey, at: str) -> fleet_pb2.FeedbackRecord:
    """The ESCALATION record `receipt` carries, once its MAC verifies under `key` (checked over
    the bytes, before they are parsed); PermissionDenied naming `at` (the receipt's field)
    otherwise."""
    if not receipt.record:
        raise PermissionDenied(at, "missing: devices send ESCALATION records only as the receipt the expert answered with")
    if receipt.key_id != key.key_id:
        raise PermissionDenied(at, f"signed under key {receipt.key_id[:64]!r}, not this cloud's receipt key "
                                   f"{key.key_id!r}")
    if not hmac.compare_digest(_mac(key, receipt.record), receipt.mac):
        raise PermissionDenied(at, "its MAC does not match its record: not a receipt this cloud issued, or altered")
    try:
        record = fleet_pb2.FeedbackRecord.FromString(receipt.record)
    except DecodeError:  # only a cloud bug gets here: the MAC says the cloud wrote these bytes
        raise PermissionDenied(at, "its record does not parse") from None
    if record.kind != fleet_pb2.ESCALATION:
        raise PermissionDenied(f"{at}.kind", "a receipt carries an ESCALATION record only")
    return record


def _mac(key: ReceiptKey, data: bytes) -> bytes:
    return hmac.new(key.secret, data, hashlib.sha256).digest()
