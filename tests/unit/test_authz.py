"""Authorisation in the cloud: the Fleet servicer on a plain grpc.aio server (no Serve), called
with the metadata the TLS proxy sets (its token, and the device its client certificate names)."""

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from cloud.audit.log import AuditLog
from cloud.feedback.receipts import ReceiptKey, escalation_record, issue
from cloud.feedback.records import LabelSet
from cloud.feedback.store import FeedbackStore
from cloud.identity import DEVICE_METADATA, PROXY_TOKEN_METADATA
from cloud.registry.models import ModelRegistry
from cloud.registry.service import FleetServicer
from cloud.training.artifact import write_manifest
from tandem.signing import generate_key, load_private_key, sign_artifact
from tandem.v1 import common_pb2, expert_pb2, fleet_pb2, fleet_pb2_grpc
from tests.fleet_server import serving

TOKEN = "proxy-secret"
TASKS = {"t": LabelSet(frozenset({"card_arrival", "lost_card"}), 1)}
KEY = ReceiptKey(b"k" * 32)
Metadata = tuple[tuple[str, str], ...]


def proxied(device: str, token: str = TOKEN) -> Metadata:
    """What the proxy sends with a call from `device`'s certificate."""
    return (PROXY_TOKEN_METADATA, token), (DEVICE_METADATA, device)


A, B = proxied("kiosk-a"), proxied("kiosk-b")


class Audit:
    """The audit log, as a list."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, object]]] = []

    def append(self, event: str, actor: str, **data: object) -> dict[str, object]:
        self.entries.append((event, data))
        return {}


@pytest.fixture(autouse=True)
def _proxy_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_PROXY_TOKEN", TOKEN)


def _servicer(tmp_path: Path, audit: object = None, quota: int = 1000, key: ReceiptKey | None = KEY) -> FleetServicer:
    return FleetServicer(FeedbackStore(str(tmp_path / "feedback")), ModelRegistry(tmp_path / "registry"), TASKS,
                         device_quota_per_day=quota, audit=audit, receipt_key=key)


def _record(record_id: str, **fields: object) -> fleet_pb2.FeedbackRecord:
    values = {"task": "t", "kind": fleet_pb2.CORRECTION, "text": "where is my card", "label": "card_arrival",
              "created_unix_ms": 1_700_000_000_000, **fields}
    return fleet_pb2.FeedbackRecord(record_id=record_id, **values)


async def _report(stub: fleet_pb2_grpc.FleetStub, records: Sequence[fleet_pb2.FeedbackRecord],
                  metadata: Metadata = A) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=records), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _stored(tmp_path: Path) -> list[tuple[str, str]]:
    table = FeedbackStore(str(tmp_path / "feedback")).read("t")
    return list(zip(table["record_id"].to_pylist(), table["device_id"].to_pylist(), strict=True))


async def test_records_are_stored_as_the_verified_device_under_its_own_ids(tmp_path: Path) -> None:
    async with serving(_servicer(tmp_path)) as stub:
        answer = await stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(
            records=[_record("r1"), _record("r2", device_id="kiosk-a")]), metadata=A, timeout=10)
    assert (answer.stored, answer.duplicates) == (2, 0)
    assert _stored(tmp_path) == [("dev/kiosk-a/r1", "kiosk-a"), ("dev/kiosk-a/r2", "kiosk-a")]


async def test_a_device_cannot_write_as_another(tmp_path: Path) -> None:
    audit = Audit()
    async with serving(_servicer(tmp_path, audit)) as stub:
        code, details = await _report(stub, [_record("r1"), _record("r2", device_id="kiosk-b")])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "records[1].device_id: 'kiosk-b' is not the calling device 'kiosk-a'"
    assert _stored(tmp_path) == []
    assert audit.entries == [("feedback_refused", {"device": "kiosk-a", "code": "PERMISSION_DENIED",
                                                   "field": "records[1].device_id", "count": 2, "suppressed": 0})]


def _answered(device: str, request_id: str = "q-1", key: ReceiptKey = KEY) -> common_pb2.Receipt:
    """The receipt an expert answers `device`'s escalation with (cloud.app.Expert)."""
    request = expert_pb2.EscalateRequest(request_id=request_id, task="t", text="where is my card", device_id=device)
    answer = expert_pb2.EscalateResponse(label="card_arrival", expert="classifier",
                                         distribution=[common_pb2.LabelScore(label="card_arrival", probability=0.9)])
    return issue(escalation_record(request, answer, 1_700_000_000_000), key)


def _escalation(receipt: common_pb2.Receipt, device: str = "kiosk-a") -> fleet_pb2.FeedbackRecord:
    """The ESCALATION record an edge sends for `receipt` (edge.feedback.FeedbackRecorder)."""
    inner = fleet_pb2.FeedbackRecord.FromString(receipt.record)
    return fleet_pb2.FeedbackRecord(record_id=inner.record_id, request_id=inner.request_id, task="t",
                                    kind=fleet_pb2.ESCALATION, device_id=device, created_unix_ms=1_700_000_000_001,
                                    receipt=receipt)


def _flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


async def test_a_devices_escalation_is_stored_once_as_the_record_its_receipt_carries(tmp_path: Path) -> None:
    """The expert's label, text and the verified device, as the expert signed them; outside
    the device's quota (the cloud's own answers)."""
    receipt = _answered("kiosk-a")
    async with serving(_servicer(tmp_path, quota=1)) as stub:
        for _ in range(2):  # an edge re-sending after a lost OK
            assert await _report(stub, [_escalation(receipt)]) == (grpc.StatusCode.OK, "")
        answer = await stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[_escalation(receipt), _record("r1")]),
                                           metadata=A, timeout=10)
        assert (answer.stored, answer.duplicates) == (1, 1)
    (row,) = [r for r in FeedbackStore(str(tmp_path / "feedback")).read("t").to_pylist() if r["kind"] == "ESCALATION"]
    assert row["record_id"].startswith("esc/kiosk-a/") and row["device_id"] == "kiosk-a"
    assert (row["request_id"], row["text"], row["label"], row["expert"]) == ("q-1", "where is my card", "card_arrival",
                                                                            "classifier")
    assert [d["label"] for d in row["distribution"]] == ["card_arrival"]


def _tampered(part: str) -> common_pb2.Receipt:
    receipt = _answered("kiosk-a")
    if part == "record":  # a bit of the label's bytes flipped: card_arrival -> card_arrivam
        receipt.record = receipt.record.replace(b"card_arrival", b"card_arrivam", 1)
    elif part == "mac":
        receipt.mac = _flipped(receipt.mac, 5)
    elif part == "key":
        receipt.CopyFrom(_answered("kiosk-a", key=ReceiptKey(b"x" * 32)))
    else:
        receipt.Clear()
    return receipt


@pytest.mark.parametrize(("part", "details"), [
    ("none", "records[0].receipt: missing"),
    ("record", "records[0].receipt: its MAC does not match its record"),
    ("mac", "records[0].receipt: its MAC does not match its record"),
    ("key", f"records[0].receipt: signed under key '{ReceiptKey(b'x' * 32).key_id}', not this cloud's"),
])
async def test_a_device_cannot_send_an_escalation_record_without_a_valid_receipt(tmp_path: Path, part: str,
                                                                                 details: str) -> None:
    """It carries an expert's label, which trains students as ground truth."""
    forged = _escalation(_tampered(part))
    if part == "none":  # a whole forged record, as devices could once try
        forged.MergeFrom(_record(forged.record_id, kind=fleet_pb2.ESCALATION, label="lost_card", expert="classifier"))
    async with serving(_servicer(tmp_path)) as stub:
        code, message = await _report(stub, [_record("r1"), forged])
    assert code == grpc.StatusCode.PERMISSION_DENIED and message.startswith(details.replace("[0]", "[1]"))
    assert _stored(tmp_path) == []


async def test_a_receipt_replayed_by_another_device_is_refused(tmp_path: Path) -> None:
    async with serving(_servicer(tmp_path)) as stub:
        code, details = await _report(stub, [_escalation(_answered("kiosk-a"), device="kiosk-b")], metadata=B)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "records[0].receipt.device_id: the escalation of 'kiosk-a', not of the calling device 'kiosk-b'"
    assert _stored(tmp_path) == []


async def test_a_receipt_must_carry_an_escalation_id_of_the_calling_device(tmp_path: Path) -> None:
    """Defence in depth: the experts build the id from the verified device (receipts.escalation_record)."""
    record = fleet_pb2.FeedbackRecord.FromString(_answered("kiosk-a").record)
    record.record_id = record.record_id.replace("kiosk-a", "kiosk-b")
    async with serving(_servicer(tmp_path)) as stub:
        code, details = await _report(stub, [_escalation(issue(record, KEY))])
    assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("records[0].receipt.record_id: ")


async def test_a_fleet_without_a_receipt_key_takes_no_escalation_records(tmp_path: Path) -> None:
    async with serving(_servicer(tmp_path, key=None)) as stub:
        code, details = await _report(stub, [_escalation(_answered("kiosk-a"))])
    assert code == grpc.StatusCode.PERMISSION_DENIED and details.startswith("records[0].receipt: this fleet holds no")


async def test_a_device_cannot_claim_an_experts_record_id_first(tmp_path: Path) -> None:
    """Before, escalation ids were sha256(device, request) of guessable values: a record sent
    with that id first made the expert's genuine record a duplicate, dropped."""
    receipt = _answered("kiosk-b")
    claimed = fleet_pb2.FeedbackRecord.FromString(receipt.record).record_id
    async with serving(_servicer(tmp_path)) as stub:
        assert (await _report(stub, [_record(claimed, kind=fleet_pb2.CORRECTION, label="lost_card")]))[0] \
            == grpc.StatusCode.OK
        assert (await _report(stub, [_escalation(receipt, device="kiosk-b")], metadata=B))[0] == grpc.StatusCode.OK
    assert _stored(tmp_path) == [(f"dev/kiosk-a/{claimed}", "kiosk-a"), (claimed, "kiosk-b")]


async def test_the_daily_quota_is_resource_exhausted_and_survives_a_restart(tmp_path: Path) -> None:
    async with serving(_servicer(tmp_path, quota=3)) as stub:
        assert (await _report(stub, [_record("r1"), _record("r2")]))[0] == grpc.StatusCode.OK
        code, details = await _report(stub, [_record("r3"), _record("r4")])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota of 3 records per day" in details and "stored 2 feedback records today" in details
    async with serving(_servicer(tmp_path, quota=3)) as stub:  # a new replica on the same store
        assert (await _report(stub, [_record("r3"), _record("r4")]))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await _report(stub, [_record("r3")]))[0] == grpc.StatusCode.OK
        assert (await _report(stub, [_record("r4")]))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await _report(stub, [_record("r4")], metadata=B))[0] == grpc.StatusCode.OK  # per device
    assert len(_stored(tmp_path)) == 4


def _scores(*pairs: tuple[str, float]) -> list[common_pb2.LabelScore]:
    return [common_pb2.LabelScore(label=label, probability=p) for label, p in pairs]


@pytest.mark.parametrize(("fields", "details"), [
    ({"distribution": _scores(*[("card_arrival", 0.01)] * 1000)},
     "records[0].distribution: 1000 entries exceed the 2 labels of task t"),
    ({"distribution": _scores(("card_arrival", 9.0))}, "records[0].distribution[0].probability: 9.0 is not in [0, 1]"),
    ({"distribution": _scores(("card_arrival", float("nan")))}, "records[0].distribution[0].probability: nan is not in [0, 1]"),
    ({"distribution": _scores(("card_arrival", 0.6), ("lost_card", 0.6))},
     "records[0].distribution: probabilities sum to 1.2, above the limit of 1.001"),
    ({"distribution": _scores(("card_arrival", 0.5), ("card_arrival", 0.5))},
     "records[0].distribution[1].label: 'card_arrival' appears twice"),
    ({"distribution": _scores(("weather", 0.5))}, "records[0].label_set_version: 0 is not newer than the cloud's version 1 of task t's label set, which lacks "
                                                     "records[0].distribution[0].label: 'weather' is not a label of task t"),
    ({"edge": common_pb2.EdgePrediction(label="weather")}, "records[0].label_set_version: 0 is not newer than the cloud's version 1 of task t's label set, which lacks "
                                                              "records[0].edge.label: 'weather' is not a label of task t"),
    ({"edge": common_pb2.EdgePrediction(confidence=-0.1)}, "records[0].edge.confidence: -0.1"),
    ({"edge": common_pb2.EdgePrediction(model_version="v" * 5000)},
     "records[0].edge.model_version: 5000 characters exceed the limit of 128"),
    ({"request_id": "r" * 5000}, "records[0].request_id: at most 128 printable ASCII characters"),
    ({"task": "t" * 5000}, "records[0].task: 5000 characters exceed the limit of 128"),
])
async def test_out_of_limit_fields_are_invalid_argument_naming_the_field(tmp_path: Path, fields: dict[str, object],
                                                                          details: str) -> None:
    async with serving(_servicer(tmp_path)) as stub:
        code, message = await _report(stub, [_record("r1", **fields)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith(details)
    assert _stored(tmp_path) == []


async def test_a_top_k_distribution_within_the_label_set_is_stored(tmp_path: Path) -> None:
    async with serving(_servicer(tmp_path)) as stub:
        scores = _scores(("lost_card", 0.7), ("card_arrival", 0.3004))  # float32 rounding above 1
        assert (await _report(stub, [_record("r1", distribution=scores)]))[0] == grpc.StatusCode.OK


def _publish(tmp_path: Path, models: ModelRegistry, payload: bytes) -> str:
    key = tmp_path / "keys" / "signing.pem"
    if not key.exists():
        generate_key(key)
    directory = tmp_path / "build" / payload.hex()
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    write_manifest(directory, kind="student", task="t", payload="model.onnx", sequence=models.next_sequence("t"))
    sign_artifact(directory, load_private_key(key))
    return models.publish("t", directory)


async def _fetch(stub: fleet_pb2_grpc.FleetStub, version: str, metadata: Metadata = A) -> list[fleet_pb2.ModelChunk]:
    return [c async for c in stub.FetchModel(fleet_pb2.FetchModelRequest(task="t", version=version), metadata=metadata,
                                             timeout=10)]


async def test_devices_fetch_only_the_promoted_version_and_its_signed_promotion(tmp_path: Path) -> None:
    servicer = _servicer(tmp_path)
    models = ModelRegistry(tmp_path / "registry")
    promoted = _publish(tmp_path, models, b"promoted")
    models.promote("t", promoted, load_private_key(tmp_path / "keys" / "signing.pem"))
    candidate = _publish(tmp_path, models, b"candidate")  # published for the gate, never promoted
    async with serving(servicer) as stub:
        manifest = await stub.GetManifest(fleet_pb2.GetManifestRequest(task="t"), metadata=A, timeout=10)
        assert manifest.version == promoted
        assert (manifest.promotion_json, manifest.promotion_signature) == models.promotion("t")
        assert {c.file for c in await _fetch(stub, promoted)} == {c.file for c in await _fetch(stub, "")}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _fetch(stub, candidate)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "is not promoted" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _fetch(stub, "../t")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("version: ")


async def test_rollouts_are_audited_once_per_version(tmp_path: Path) -> None:
    audit = Audit()
    servicer = _servicer(tmp_path, audit)
    version = _publish(tmp_path, ModelRegistry(tmp_path / "registry"), b"model")
    async with serving(servicer) as stub:
        for _ in range(2):  # an edge that repeats its acknowledgement
            await stub.AckRollout(fleet_pb2.AckRolloutRequest(task="t", version=version), metadata=A, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.AckRollout(fleet_pb2.AckRolloutRequest(task="t", version="absent"), metadata=A, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert audit.entries == [("rollout_ack", {"device": "kiosk-a", "task": "t", "version": version})]


@pytest.mark.parametrize("metadata", [(), proxied("kiosk-a", token="guessed"), proxied("kiosk-a")[:1],
                                      proxied("kiosk/a")])
async def test_a_call_without_the_proxys_verified_identity_is_unauthenticated(tmp_path: Path, metadata: Metadata) -> None:
    """A caller that reaches the cloud's port directly cannot know the proxy's token."""
    calls = {
        "ReportFeedback": lambda s: s.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[_record("r1")]),
                                                     metadata=metadata, timeout=10),
        "GetManifest": lambda s: s.GetManifest(fleet_pb2.GetManifestRequest(task="t"), metadata=metadata, timeout=10),
        "FetchModel": lambda s: _fetch(s, "", metadata),
        "GetRoutes": lambda s: s.GetRoutes(fleet_pb2.GetRoutesRequest(), metadata=metadata, timeout=10),
        "AckRollout": lambda s: s.AckRollout(fleet_pb2.AckRolloutRequest(task="t", version="v1"), metadata=metadata,
                                             timeout=10),
    }
    assert sorted(calls) == sorted(fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].methods_by_name)
    async with serving(_servicer(tmp_path)) as stub:
        for method, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(stub)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert info.value.details(), method
    assert _stored(tmp_path) == []


def test_a_cloud_without_the_proxy_token_does_not_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It would refuse every call, and only its callers would see why."""
    monkeypatch.delenv("TANDEM_PROXY_TOKEN")
    with pytest.raises(ValueError, match="TANDEM_PROXY_TOKEN is not set"):
        _servicer(tmp_path)


async def test_refused_batches_reach_a_real_audit_log_without_flooding_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(str(tmp_path / "feedback" / "_audit"))
    forged = [_record("e1", kind=fleet_pb2.ESCALATION)]
    servicer = _servicer(tmp_path, log)
    async with serving(servicer) as stub:
        for _ in range(3):  # a device retrying a refused batch in a loop
            assert (await _report(stub, forged))[0] == grpc.StatusCode.PERMISSION_DENIED
        monkeypatch.setattr(servicer._refusals, "every_s", 0.0)  # as if AUDIT_REFUSALS_EVERY_S had passed
        assert (await _report(stub, forged))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert log.verify() == 2
    assert [(e["event"], e["actor"], e["data"]["suppressed"]) for e in log.entries()] == [
        ("feedback_refused", "fleet", 0), ("feedback_refused", "fleet", 2)]
    assert _stored(tmp_path) == []  # the audit log is no task of the store


def test_the_servicer_implements_every_fleet_rpc() -> None:
    """The generated base answers UNIMPLEMENTED for any method the servicer leaves out."""
    methods = fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].methods_by_name
    assert all(getattr(FleetServicer, m) is not getattr(fleet_pb2_grpc.FleetServicer, m) for m in methods)
