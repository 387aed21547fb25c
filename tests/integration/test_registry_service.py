"""FleetServicer on a plain grpc.aio server: a FeedbackStore and a ModelRegistry on temporary
directories, as an edge's tests run it (no Ray)."""

import itertools
import os
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cloud.feedback import FeedbackStore
from cloud.feedback.records import LabelSet
from cloud.registry import ModelRegistry
from cloud.registry.service import CHUNK_BYTES, FleetMetrics, FleetServicer
from cloud.training.artifact import write_manifest
from tandem.contract import MANIFEST_FILE, SIGNATURE_FILE
from tandem.signing import (
    Keyring,
    generate_key,
    key_id,
    load_private_key,
    sign_artifact,
    verify_artifact,
    verify_promotion,
)
from tandem.v1 import fleet_pb2, fleet_pb2_grpc
from tests.fleet_server import serving

pytestmark = pytest.mark.integration

TASKS = {"t": LabelSet(frozenset({"card_arrival", "lost_card"}), 1), "u": LabelSet(frozenset({"card_arrival"}), 1)}
ROUTES = {"t": "classifier", "u": "llm"}
SEQUENCE = itertools.count(1)  # each published version's: above every earlier one's
Served = tuple[fleet_pb2_grpc.FleetStub, FeedbackStore, ModelRegistry]


@pytest.fixture()
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "signing.pem"
    generate_key(path)
    return path


@pytest_asyncio.fixture()
async def fleet(tmp_path: Path) -> AsyncIterator[Served]:
    store, models = FeedbackStore(str(tmp_path / "feedback")), ModelRegistry(tmp_path / "registry")
    # insecure: callers are who their records say (test_authz.py covers the proxy's identity).
    async with serving(FleetServicer(store, models, TASKS, ROUTES, max_batch=10, insecure=True)) as stub:
        yield stub, store, models


def _record(record_id: str, **fields: object) -> fleet_pb2.FeedbackRecord:
    values = {"task": "t", "kind": fleet_pb2.CORRECTION, "text": "where is my card", "label": "card_arrival",
              "created_unix_ms": 1_700_000_000_000, "device_id": "kiosk-1", **fields}
    return fleet_pb2.FeedbackRecord(record_id=record_id, **values)


def _artifact(key_path: Path, name: str, payload: bytes) -> Path:
    directory = key_path.parent.parent / "build" / name
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(payload)
    (directory / "labels.json").write_text('["card_arrival", "lost_card"]\n')
    (directory / "empty.txt").write_bytes(b"")
    write_manifest(directory, kind="student", task="t", payload="model.onnx", sequence=next(SEQUENCE))
    sign_artifact(directory, load_private_key(key_path))
    return directory


async def test_the_same_feedback_batch_sent_twice_is_stored_once(fleet: Served) -> None:
    stub, store, _ = fleet
    request = fleet_pb2.ReportFeedbackRequest(records=[_record("c1"), _record("c2"), _record("c1")])
    first = await stub.ReportFeedback(request, timeout=10)
    second = await stub.ReportFeedback(request, timeout=10)
    assert (first.stored, first.duplicates) == (2, 1)
    assert (second.stored, second.duplicates) == (0, 3)
    assert store.read("t")["record_id"].to_pylist() == ["dev/kiosk-1/c1", "dev/kiosk-1/c2"]


async def test_routes_name_each_tasks_expert_application(fleet: Served) -> None:
    stub, _, _ = fleet
    assert dict((await stub.GetRoutes(fleet_pb2.GetRoutesRequest(), timeout=10)).applications) == ROUTES


@pytest.mark.parametrize(
    ("records", "details"),
    [
        ([_record("ok"), _record("big", text="x" * 2049)], "records[1].text: 2049 bytes exceeds the limit of 2048 bytes"),
        ([_record("w", task="weather")], "records[0].task: unknown task 'weather'"),
        ([_record(f"r{i}") for i in range(11)], "records: 11 records exceed the batch limit of 10"),
    ],
)
async def test_invalid_feedback_is_invalid_argument(fleet: Served, records: list[fleet_pb2.FeedbackRecord],
                                                    details: str) -> None:
    stub, store, _ = fleet
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=records), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and details in info.value.details()
    assert store.read("t").num_rows == 0


async def test_the_promoted_student_arrives_byte_identical_and_verifies(fleet: Served, key_path: Path,
                                                                        tmp_path: Path) -> None:
    stub, _, models = fleet
    payload = os.urandom(2 * CHUNK_BYTES + 12345)  # three chunks, the last one short
    older = models.publish("t", _artifact(key_path, "old", b"old model"))
    version = models.publish("t", _artifact(key_path, "new", payload))
    models.promote("t", version, load_private_key(key_path))

    manifest = await stub.GetManifest(fleet_pb2.GetManifestRequest(task="t"), timeout=10)
    published = models.path("t", version)
    assert (manifest.task, manifest.version) == ("t", version)
    assert manifest.manifest_json == (published / MANIFEST_FILE).read_bytes()
    assert manifest.signature == (published / SIGNATURE_FILE).read_bytes()
    assert (manifest.promotion_json, manifest.promotion_signature) == models.promotion("t")
    assert {f.name: f.size for f in manifest.files} == {
        p.name: p.stat().st_size for p in published.iterdir() if p.name not in (MANIFEST_FILE, SIGNATURE_FILE)
    }
    assert {f.name for f in manifest.files} == {"empty.txt", "labels.json", "model.onnx"}

    chunks = [c async for c in stub.FetchModel(fleet_pb2.FetchModelRequest(task="t", version=version), timeout=10)]
    assert [c.file for c in chunks[:2]] == [MANIFEST_FILE, SIGNATURE_FILE]
    assert max(len(c.data) for c in chunks) == CHUNK_BYTES
    received = _reassemble(chunks, tmp_path / "received")
    assert {p.name: p.read_bytes() for p in received.iterdir()} == {p.name: p.read_bytes() for p in published.iterdir()}
    public = load_private_key(key_path).public_key()
    keyring = Keyring({key_id(public): public})
    verified, _ = verify_artifact(received, keyring)
    promotion = verify_promotion(manifest.promotion_json, manifest.promotion_signature, keyring)
    assert verified.version == version
    assert (promotion.task, promotion.version, promotion.sequence) == ("t", version, verified.sequence)

    with pytest.raises(grpc.aio.AioRpcError) as info:  # published, not promoted: it stays in the cloud
        await _drain(stub.FetchModel(fleet_pb2.FetchModelRequest(task="t", version=older), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "is not promoted" in info.value.details()
    promoted = [c async for c in stub.FetchModel(fleet_pb2.FetchModelRequest(task="t"), timeout=10)]
    assert promoted == chunks, "an empty version means the promoted one"


@pytest.mark.parametrize(
    ("call", "code", "details"),
    [
        ("GetManifest:weather", grpc.StatusCode.NOT_FOUND, "task 'weather' has no promoted model"),
        ("GetManifest:t", grpc.StatusCode.NOT_FOUND, "task 't' has no promoted model"),
        ("FetchModel:t:absent", grpc.StatusCode.NOT_FOUND, "task 't' has no promoted model"),
        ("FetchModel:t:../t", grpc.StatusCode.INVALID_ARGUMENT, "version: invalid name '../t'"),
    ],
)
async def test_unknown_tasks_and_versions_are_refused(fleet: Served, key_path: Path, call: str, code: grpc.StatusCode,
                                                      details: str) -> None:
    stub, _, models = fleet
    models.publish("t", _artifact(key_path, "unpromoted", b"model"))
    method, task, *version = call.split(":")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if method == "GetManifest":
            await stub.GetManifest(fleet_pb2.GetManifestRequest(task=task), timeout=10)
        else:
            [c async for c in stub.FetchModel(fleet_pb2.FetchModelRequest(task=task, version=version[0]), timeout=10)]
    assert info.value.code() == code and details in info.value.details()


def _reassemble(chunks: list[fleet_pb2.ModelChunk], directory: Path) -> Path:
    directory.mkdir()
    for chunk in chunks:
        path = directory / chunk.file
        assert (path.stat().st_size if path.exists() else 0) == chunk.offset, "chunks arrive in order, file after file"
        with path.open("ab") as f:
            f.write(chunk.data)
    return directory


async def test_an_unreadable_registry_is_unavailable_not_unknown(fleet: Served, key_path: Path) -> None:
    """A damaged published version (its signature lost on the volume) must not crash the RPCs."""
    stub, _, models = fleet
    version = models.publish("t", _artifact(key_path, "v1", b"onnx bytes"))
    models.promote("t", version, load_private_key(key_path))
    (models.path("t", version) / SIGNATURE_FILE).unlink()
    for call in (stub.GetManifest(fleet_pb2.GetManifestRequest(task="t"), timeout=10),
                 _drain(stub.FetchModel(fleet_pb2.FetchModelRequest(task="t"), timeout=10))):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "registry read failed" in info.value.details()


async def _drain(stream: AsyncIterator[fleet_pb2.ModelChunk]) -> None:
    async for _ in stream:
        pass


class Counted(FleetMetrics):
    def __init__(self) -> None:
        self.quarantines: list[tuple[str, str]] = []
        self.requests: list[tuple[str, grpc.StatusCode]] = []

    def request(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.append((method, code))

    def quarantined(self, task: str, path: str) -> None:
        self.quarantines.append((task, path))


async def test_a_corrupt_store_file_is_quarantined_and_feedback_is_still_stored(tmp_path: Path) -> None:
    """Before: ArrowInvalid escaped the servicer, every ReportFeedback of the task failed and
    edges retried forever."""
    FeedbackStore(str(tmp_path / "feedback")).add([_record("dev/kiosk-1/c1")])  # as the servicer stores c1
    bad = next((tmp_path / "feedback").glob("task=t/date=*")) / "part-garbage.parquet"
    bad.write_bytes(b"not parquet" * 100)
    metrics = Counted()
    store = FeedbackStore(str(tmp_path / "feedback"), on_quarantine=metrics.quarantined)
    async with serving(FleetServicer(store, ModelRegistry(tmp_path / "registry"), TASKS, metrics=metrics, insecure=True)) as stub:
        answer = await stub.ReportFeedback(fleet_pb2.ReportFeedbackRequest(records=[_record("c1"), _record("c2")]), timeout=10)
    assert (answer.stored, answer.duplicates) == (1, 1)
    assert metrics.quarantines == [("t", str(bad))] and metrics.requests == [("ReportFeedback", grpc.StatusCode.OK)]
    assert (tmp_path / "feedback" / "_quarantine" / bad.relative_to(tmp_path / "feedback")).exists()
    assert store.read("t")["record_id"].to_pylist() == ["dev/kiosk-1/c1", "dev/kiosk-1/c2"]


class HungStore(FeedbackStore):
    """A store whose writes wait until released: a hung disk or object store."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.release = threading.Event()

    def add(self, records: Sequence[fleet_pb2.FeedbackRecord]) -> list[fleet_pb2.FeedbackRecord]:
        self.release.wait()
        return super().add(records)


class HungRegistry(ModelRegistry):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()

    def promotion(self, task: str) -> tuple[bytes, bytes] | None:
        self.release.wait()
        return super().promotion(task)


async def test_a_hung_store_or_registry_is_deadline_exceeded_within_the_request_timeout(tmp_path: Path) -> None:
    store, models = HungStore(str(tmp_path / "feedback")), HungRegistry(tmp_path / "registry")
    metrics = Counted()
    servicer = FleetServicer(store, models, TASKS, metrics=metrics, request_timeout_s=0.2, insecure=True)
    records = fleet_pb2.ReportFeedbackRequest(records=[_record("c1"), _record("c2")])
    try:
        async with serving(servicer) as stub:
            # The client would wait far longer: the servicer gives up first and frees its slot.
            calls = [stub.ReportFeedback(records, timeout=60), stub.GetManifest(fleet_pb2.GetManifestRequest(task="t"), timeout=60),
                     _drain(stub.FetchModel(fleet_pb2.FetchModelRequest(task="t"), timeout=60))]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "longer than the request timeout of 0.2 s" in info.value.details()
            assert [code for _, code in metrics.requests] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
            store.release.set()
            models.release.set()
            retry = await stub.ReportFeedback(records, timeout=10)  # the edge's retry
            # Stored once: by the timed-out call's write, which finished after all, or by the retry.
            assert (retry.stored, retry.duplicates) in {(2, 0), (0, 2)}
    finally:
        store.release.set()
        models.release.set()
    assert store.read("t")["record_id"].to_pylist() == ["dev/kiosk-1/c1", "dev/kiosk-1/c2"]
