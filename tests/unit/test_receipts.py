"""Escalation receipts (cloud/feedback/receipts.py): the MAC over the record's exact bytes,
and the key file they are signed under."""

from pathlib import Path

import pytest

from cloud.errors import PermissionDenied
from cloud.feedback.receipts import KEY_BYTES, ReceiptKey, create_key, issue, load_key, verify
from tandem.v1 import common_pb2, fleet_pb2

KEY = ReceiptKey(b"a" * KEY_BYTES)
RECORD = fleet_pb2.FeedbackRecord(record_id="esc/kiosk-1/0f", kind=fleet_pb2.ESCALATION, task="t", label="card_arrival")


def _flip(data: bytes, bit: int) -> bytes:
    """`data` with one bit flipped."""
    i, mask = divmod(bit, 8)
    return data[:i] + bytes([data[i] ^ (1 << mask)]) + data[i + 1:]


def test_a_receipt_carries_its_record_under_the_keys_id() -> None:
    receipt = issue(RECORD, KEY)
    assert receipt.key_id == KEY.key_id and len(KEY.key_id) == 16 and KEY.key_id not in KEY.secret.hex()
    assert verify(receipt, KEY, "records[0].receipt") == RECORD


@pytest.mark.parametrize("part", ["record", "mac"])
def test_any_bit_flipped_in_the_record_or_its_mac_is_refused(part: str) -> None:
    genuine = issue(RECORD, KEY)
    for bit in range(len(getattr(genuine, part)) * 8):
        receipt = common_pb2.Receipt()
        receipt.CopyFrom(genuine)
        setattr(receipt, part, _flip(getattr(genuine, part), bit))
        with pytest.raises(PermissionDenied, match=r"^records\[3\]\.receipt: its MAC does not match its record"):
            verify(receipt, KEY, "records[3].receipt")


def test_a_receipt_under_another_key_is_refused_whatever_id_it_claims() -> None:
    other = ReceiptKey(b"b" * KEY_BYTES)
    with pytest.raises(PermissionDenied, match=f"signed under key '{other.key_id}', not this cloud's"):
        verify(issue(RECORD, other), KEY, "r")
    relabelled = issue(RECORD, other)
    relabelled.key_id = KEY.key_id
    with pytest.raises(PermissionDenied, match="its MAC does not match"):
        verify(relabelled, KEY, "r")


def test_a_missing_receipt_or_one_of_another_kind_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="^r: missing"):
        verify(common_pb2.Receipt(), KEY, "r")
    correction = fleet_pb2.FeedbackRecord(record_id="x", kind=fleet_pb2.CORRECTION)
    with pytest.raises(PermissionDenied, match=r"^r\.kind: a receipt carries an ESCALATION record only"):
        verify(issue(correction, KEY), KEY, "r")


def test_the_key_file_is_created_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "receipt.key"
    with pytest.raises(ValueError, match="receipt_key"):
        load_key(path)
    assert create_key(path) and (path.stat().st_mode & 0o777) == 0o600
    key = load_key(path)
    assert not create_key(path) and load_key(path) == key, "a restart keeps the key: edges hold its receipts"
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="holds 5 bytes, fewer than 32"):
        load_key(path)
