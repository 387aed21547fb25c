import asyncio
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from edge.config import FeedbackConfig, LoopHealthConfig
from edge.delivery import Delivery
from edge.errors import CloudCallError
from edge.feedback import FeedbackRecorder
from edge.health import DELIVERY, LoopHealth
from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from edge.redact import DEFAULT_PATTERNS, Redactor
from tandem.v1 import common_pb2, fleet_pb2


def _record(i: int) -> fleet_pb2.FeedbackRecord:
    return fleet_pb2.FeedbackRecord(record_id=f"r{i:03d}", task="t", kind=fleet_pb2.FALLBACK, text=f"text {i}")


def _ids(records: list[fleet_pb2.FeedbackRecord]) -> list[str]:
    return [r.record_id for r in records]


@pytest.fixture()
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite3", max_records=5)
    yield box
    box.close()


def test_the_database_is_in_wal_mode(tmp_path: Path, outbox: Outbox) -> None:
    db = sqlite3.connect(tmp_path / "outbox.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_refuses_when_full_and_keeps_what_it_accepted(outbox: Outbox) -> None:
    accepted = [outbox.add(_record(i)) for i in range(7)]
    assert accepted == [True] * 5 + [False] * 2
    assert outbox.depth == 5 and _ids(outbox.oldest(10)) == [f"r{i:03d}" for i in range(5)]
    outbox.remove(["r000"])
    assert outbox.add(_record(9)) and outbox.depth == 5


def test_hands_out_the_oldest_first_and_keeps_them_until_removed(outbox: Outbox) -> None:
    for i in (3, 1, 2):
        outbox.add(_record(i))
    assert _ids(outbox.oldest(2)) == ["r003", "r001"]
    assert _ids(outbox.oldest(2)) == ["r003", "r001"], "reading must not consume"


def test_removing_deletes_only_the_acknowledged_ids(outbox: Outbox) -> None:
    for i in range(4):
        outbox.add(_record(i))
    outbox.remove(["r001", "r003", "never-added"])
    assert _ids(outbox.oldest(10)) == ["r000", "r002"] and outbox.depth == 2


def test_adding_a_waiting_record_again_stores_it_once(outbox: Outbox) -> None:
    assert outbox.add(_record(1)) and outbox.add(_record(1))
    assert outbox.depth == 1


def test_survives_reopening_with_order_and_count(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    first = Outbox(path, max_records=10)
    for i in (5, 4, 6):
        first.add(_record(i))
    first.remove(["r004"])
    del first  # not closed: as after a crash
    again = Outbox(path, max_records=10)
    assert _ids(again.oldest(10)) == ["r005", "r006"] and again.depth == 2
    assert again.oldest(10)[0] == _record(5)
    again.close()


def test_buried_records_leave_the_queue_and_keep_the_reason(outbox: Outbox) -> None:
    for i in range(3):
        outbox.add(_record(i))
    outbox.bury(outbox.oldest(2), "INVALID_ARGUMENT: records[0].task: unknown")
    assert _ids(outbox.oldest(10)) == ["r002"] and outbox.depth == 1
    assert [(r.record_id, why) for r, why in outbox.dead()] == [
        ("r000", "INVALID_ARGUMENT: records[0].task: unknown"),
        ("r001", "INVALID_ARGUMENT: records[0].task: unknown"),
    ]


def _recorder(outbox: Outbox, registry: CollectorRegistry, audit_draw: float = 0.5) -> FeedbackRecorder:
    return FeedbackRecorder(outbox, Redactor(DEFAULT_PATTERNS), "dev-1", 0.01, EdgeMetrics(registry),
                            on_added=lambda: None, chance=lambda: audit_draw)


async def test_recorder_redacts_before_storing_and_stamps_the_record(outbox: Outbox) -> None:
    recorder = _recorder(outbox, CollectorRegistry())
    record_id = await recorder.record(fleet_pb2.CORRECTION, "t", "I am a@b.com, card 4111 1111 1111 1111", "req-1", 3,
                                      label="card_arrival")
    (stored,) = outbox.oldest(1)
    assert stored.record_id == record_id and len(record_id) == 32
    assert stored.text == "I am [EMAIL], card [CARD]"
    assert (stored.kind, stored.label, stored.request_id, stored.device_id, stored.label_set_version) == (
        fleet_pb2.CORRECTION, "card_arrival", "req-1", "dev-1", 3)
    assert stored.created_unix_ms > 1_700_000_000_000


async def test_recorder_counts_refusals_when_full(outbox: Outbox) -> None:
    registry = CollectorRegistry()
    recorder = _recorder(outbox, registry)
    ids = [await recorder.record(fleet_pb2.FALLBACK, "t", "hi", f"r{i}", 1) for i in range(8)]
    assert all(ids[:5]) and ids[5:] == [None] * 3
    refused = registry.get_sample_value(
        "tandem_edge_feedback_refused_total", {"task": "t", "kind": "FALLBACK", "reason": "full"})
    recorded = registry.get_sample_value("tandem_edge_feedback_recorded_total", {"task": "t", "kind": "FALLBACK"})
    assert (refused, recorded) == (3, 5)


async def test_concurrent_records_share_transactions_and_a_full_batch_refuses_only_its_overflow(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    commits: list[int] = []
    add_many = outbox.add_many
    monkeypatch.setattr(outbox, "add_many", lambda records: commits.append(len(records)) or add_many(records))
    registry = CollectorRegistry()
    recorder = _recorder(outbox, registry)
    ids = await asyncio.gather(*(recorder.record(fleet_pb2.FALLBACK, "t", "hi", f"r{i}", 1) for i in range(8)))
    assert sum(commits) == 8 and len(commits) < 8  # the outbox holds 5: one group commit took several
    assert sum(i is not None for i in ids) == 5 == outbox.depth
    assert registry.get_sample_value(
        "tandem_edge_feedback_refused_total", {"task": "t", "kind": "FALLBACK", "reason": "full"}) == 3


async def test_a_failing_disk_refuses_records_and_logs_once_per_episode(
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    recorder = _recorder(outbox, registry)

    def full(records: list[fleet_pb2.FeedbackRecord]) -> list[bool]:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(outbox, "add_many", full)
        assert [await recorder.record(fleet_pb2.FALLBACK, "t", "hi", f"r{i}", 1) for i in range(3)] == [None] * 3
    assert await recorder.record(fleet_pb2.FALLBACK, "t", "hi", "r3", 1) is not None
    assert registry.get_sample_value(
        "tandem_edge_feedback_refused_total", {"task": "t", "kind": "FALLBACK", "reason": "error"}) == 3
    assert sum("write failed" in r.message for r in caplog.records) == 1
    assert any("succeed again" in r.message for r in caplog.records)


def test_audit_samples_the_configured_share(outbox: Outbox) -> None:
    assert _recorder(outbox, CollectorRegistry(), audit_draw=0.005).audit_due("t", 0.0)
    assert not _recorder(outbox, CollectorRegistry(), audit_draw=0.5).audit_due("t", 0.0)
    seeded = random.Random(3)
    recorder = FeedbackRecorder(outbox, Redactor(DEFAULT_PATTERNS), "dev-1", 0.05, EdgeMetrics(CollectorRegistry()),
                                on_added=lambda: None, chance=seeded.random)
    share = sum(recorder.audit_due("t", 0.0) for _ in range(20_000)) / 20_000
    assert abs(share - 0.05) < 0.006  # 4 standard deviations of a binomial share


class ScriptedSink:
    """Fails with the scripted codes in turn, then stores, refusing any batch holding an
    `invalid` id as the cloud does; records every batch it was sent."""

    def __init__(self, failures: list[grpc.StatusCode], invalid: str = "", refusal: str = "text: blank") -> None:
        self.failures = failures
        self.invalid = invalid
        self.refusal = refusal
        self.sent: list[list[str]] = []

    async def report_feedback(self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float) -> fleet_pb2.ReportFeedbackResponse:
        self.sent.append(_ids(records))
        if self.failures:
            raise CloudCallError(self.failures.pop(0), "scripted")
        if self.invalid in _ids(records):
            raise CloudCallError(grpc.StatusCode.INVALID_ARGUMENT, f"records[{_ids(records).index(self.invalid)}].{self.refusal}")
        return fleet_pb2.ReportFeedbackResponse(stored=len(records))


def _delivery(outbox: Outbox, sink: ScriptedSink, registry: CollectorRegistry, batch_size: int,
              servicer: health.aio.HealthServicer | None = None, **cfg: float) -> Delivery:
    metrics = EdgeMetrics(registry)
    loop_health = LoopHealth(DELIVERY, servicer or health.aio.HealthServicer(), LoopHealthConfig(failure_threshold=2),
                             metrics)
    feedback = FeedbackConfig(outbox=None, batch_size=batch_size, min_backoff_s=0.01, max_backoff_s=0.02, **cfg)
    return Delivery(outbox, sink, feedback, metrics, loop_health)


async def _deliver_until_empty(outbox: Outbox, sink: ScriptedSink, registry: CollectorRegistry, batch_size: int) -> None:
    waiting = outbox.depth
    running = asyncio.ensure_future(_delivery(outbox, sink, registry, batch_size).run())
    for _ in range(200):
        await asyncio.sleep(0.01)
        # Counted after leaving the outbox: wait for the counts too, or cancelling may beat them.
        counted = sum(registry.get_sample_value(f"tandem_edge_feedback_{n}_total") or 0 for n in ("delivered", "dead"))
        if outbox.depth == 0 and counted == waiting:
            break
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_delivery_sends_oldest_first_in_batches_retrying_transient_failures(outbox: Outbox) -> None:
    for i in range(5):
        outbox.add(_record(i))
    registry = CollectorRegistry()
    sink = ScriptedSink([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
    await _deliver_until_empty(outbox, sink, registry, batch_size=2)
    assert sink.sent == [["r000", "r001"]] * 3 + [["r002", "r003"], ["r004"]]
    assert registry.get_sample_value("tandem_edge_feedback_delivered_total") == 5
    assert registry.get_sample_value("tandem_edge_feedback_delivery_failures_total", {"code": "UNAVAILABLE"}) == 1


class SizeLimitedSink(ScriptedSink):
    """Refuses the first call as a full queue would, then any batch over two records as too large."""

    async def report_feedback(self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float) -> fleet_pb2.ReportFeedbackResponse:
        self.sent.append(_ids(records))
        if len(self.sent) == 1:
            raise CloudCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if len(records) > 2:
            raise CloudCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 8)")
        return fleet_pb2.ReportFeedbackResponse(stored=len(records))


async def test_delivery_halves_a_batch_too_large_for_the_cloud_but_not_one_a_full_queue_refused(outbox: Outbox) -> None:
    for i in range(4):
        outbox.add(_record(i))
    sink = SizeLimitedSink([])
    await _deliver_until_empty(outbox, sink, CollectorRegistry(), batch_size=4)
    # A full queue: the same batch again after a backoff, not smaller ones into the busy cloud.
    assert sink.sent == [["r000", "r001", "r002", "r003"]] * 2 + [["r000", "r001"], ["r002", "r003"]]


async def test_delivery_moves_only_the_record_the_cloud_calls_invalid_aside(outbox: Outbox) -> None:
    for i in range(5):
        outbox.add(_record(i))
    registry = CollectorRegistry()
    sink = ScriptedSink([], invalid="r001")
    await _deliver_until_empty(outbox, sink, registry, batch_size=4)
    assert [(r.record_id, why) for r, why in outbox.dead()] == [
        ("r001", "cloud answered INVALID_ARGUMENT: records[0].text: blank")]
    assert sink.sent[:4] == [["r000", "r001", "r002", "r003"], ["r000", "r001"], ["r000"], ["r001"]]
    assert registry.get_sample_value("tandem_edge_feedback_dead_total") == 1
    assert registry.get_sample_value("tandem_edge_feedback_delivered_total") == 4


def test_refuses_beyond_the_byte_bound_like_the_record_bound(tmp_path: Path) -> None:
    size = len(_record(0).SerializeToString())
    box = Outbox(tmp_path / "o.sqlite3", max_records=100, max_bytes=3 * size)
    assert [box.add(_record(i)) for i in range(5)] == [True] * 3 + [False] * 2
    assert (box.depth, box.size_bytes) == (3, 3 * size)
    box.remove(["r000"])
    assert box.size_bytes == 2 * size and box.add(_record(7))
    box.close()
    again = Outbox(tmp_path / "o.sqlite3", max_records=100, max_bytes=3 * size)
    assert (again.depth, again.size_bytes) == (3, 3 * size), "the bounds are recounted at open"
    again.close()


def test_the_journal_size_limit_is_set(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=10, journal_size_limit_bytes=1 << 20)
    assert box._db.execute("PRAGMA journal_size_limit").fetchone()[0] == 1 << 20
    box.close()


def test_a_file_that_is_not_a_database_raises_a_database_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    path.write_bytes(b"this is not SQLite, just garbage " * 100)
    with pytest.raises(sqlite3.DatabaseError):
        Outbox(path, max_records=10)


def test_the_dead_table_keeps_the_newest_max_dead_and_says_how_many_it_dropped(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=10, max_dead=2)
    for i in range(4):
        box.add(_record(i))
    dropped = [box.bury([record], f"bad {record.record_id}") for record in box.oldest(4)]
    assert dropped == [0, 0, 1, 1] and box.dead_count == 2
    assert [r.record_id for r, _ in box.dead()] == ["r002", "r003"]
    box.close()


def test_redrive_moves_dead_records_back_behind_the_waiting_ones_within_the_bounds(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=3)
    for i in range(3):
        box.add(_record(i))
    box.bury(box.oldest(2), "INVALID_ARGUMENT: records[0].text: blank")
    box.add(_record(5))
    assert box.redrive() == (1, 1), "one free place: the oldest dead record goes back, the other stays"
    assert _ids(box.oldest(10)) == ["r002", "r005", "r000"] and box.depth == 3
    box.remove(["r002"])
    assert box.redrive() == (1, 0) and box.dead() == []
    assert _ids(box.oldest(10)) == ["r005", "r000", "r001"] and box.oldest(10)[2] == _record(1)
    box.close()


def test_deferring_moves_a_record_behind_the_others(outbox: Outbox) -> None:
    for i in range(3):
        outbox.add(_record(i))
    outbox.defer("r000")
    assert _ids(outbox.oldest(10)) == ["r001", "r002", "r000"] and outbox.depth == 3


async def _deliver_until(delivery: Delivery, done: Callable[[], bool]) -> None:
    running = asyncio.ensure_future(delivery.run())
    for _ in range(300):
        await asyncio.sleep(0.01)
        if done():
            break
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


@pytest.mark.parametrize("refusal", ["task: unknown task 't'; the cloud has ['u']", "label: 'x' is not a label of task t"])
async def test_a_record_the_cloud_lacks_the_configuration_for_is_kept_and_retried_behind_the_others(
    outbox: Outbox, refusal: str
) -> None:
    for i in range(5):
        outbox.add(_record(i))
    registry = CollectorRegistry()
    sink = ScriptedSink([], invalid="r001", refusal=refusal)
    delivery = _delivery(outbox, sink, registry, batch_size=4)
    await _deliver_until(delivery, lambda: registry.get_sample_value("tandem_edge_feedback_delivered_total") == 4)
    assert _ids(outbox.oldest(10)) == ["r001"] and outbox.dead() == []
    field = refusal.split(":")[0]
    assert registry.get_sample_value("tandem_edge_feedback_deferred_total", {"field": field}) >= 1
    sink.invalid = ""  # the cloud's configuration is fixed
    await _deliver_until(delivery, lambda: outbox.depth == 0)
    assert outbox.depth == 0 and sink.sent[-1] == ["r001"]
    assert not registry.get_sample_value("tandem_edge_feedback_dead_total")


class RefusesAll(ScriptedSink):
    async def report_feedback(self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float) -> fleet_pb2.ReportFeedbackResponse:
        self.sent.append(_ids(records))
        raise CloudCallError(grpc.StatusCode.INVALID_ARGUMENT, "records[0].text: blank")


async def test_burying_beyond_max_dead_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_records=10, max_dead=1)
    for i in range(3):
        box.add(_record(i))
    registry = CollectorRegistry()
    delivery = _delivery(box, RefusesAll([]), registry, batch_size=1)
    await _deliver_until(delivery, lambda: registry.get_sample_value("tandem_edge_feedback_dead_dropped_total") == 2)
    assert [r.record_id for r, _ in box.dead()] == ["r002"] and box.dead_count == 1 and box.depth == 0
    assert registry.get_sample_value("tandem_edge_feedback_dead_total") == 3
    box.close()


class WatchingSink(ScriptedSink):
    """Notes the delivery sub-service's health as each call arrives."""

    def __init__(self, failures: list[grpc.StatusCode], servicer: health.aio.HealthServicer) -> None:
        super().__init__(failures)
        self.servicer = servicer
        self.health_seen: list[str] = []

    async def report_feedback(self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float) -> fleet_pb2.ReportFeedbackResponse:
        self.health_seen.append(await _status(self.servicer))
        return await super().report_feedback(records, timeout_s)


async def _status(servicer: health.aio.HealthServicer) -> str:
    answer = await servicer.Check(health_pb2.HealthCheckRequest(service=DELIVERY), None)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


async def test_delivery_reports_not_serving_while_it_keeps_failing_and_serving_after_a_success(outbox: Outbox) -> None:
    outbox.add(_record(0))
    registry = CollectorRegistry()
    servicer = health.aio.HealthServicer()
    sink = WatchingSink([grpc.StatusCode.UNAVAILABLE] * 3, servicer)
    delivery = _delivery(outbox, sink, registry, batch_size=10, servicer=servicer)  # NOT_SERVING after 2 failures
    await delivery._health.start()
    await _deliver_until(delivery, lambda: registry.get_sample_value(
        "tandem_edge_feedback_delivered_total") == 1 and registry.get_sample_value(
        "tandem_edge_loop_serving", {"loop": "delivery"}) == 1)
    assert sink.health_seen == ["SERVING", "SERVING", "NOT_SERVING", "NOT_SERVING"]
    assert await _status(servicer) == "SERVING"
    assert registry.get_sample_value("tandem_edge_loop_serving", {"loop": "delivery"}) == 1


def test_redrive_from_the_config_moves_the_dead_records_of_the_configured_outbox(tmp_path: Path) -> None:
    from edge.config import EdgeConfig
    from edge.daemon import redrive

    cfg = EdgeConfig(tasks={"t": tmp_path}, policy={"mode": "edge_only"},
                     feedback=FeedbackConfig(outbox=tmp_path / "o.sqlite3"))
    assert redrive(cfg) == (0, 0), "no outbox yet: nothing to move"
    box = Outbox(tmp_path / "o.sqlite3", max_records=10)
    box.add(_record(1))
    box.bury(box.oldest(1), "INVALID_ARGUMENT: records[0].text: blank")
    box.close()
    assert redrive(cfg) == (1, 0)
    again = Outbox(tmp_path / "o.sqlite3", max_records=10)
    assert _ids(again.oldest(10)) == ["r001"] and again.dead() == []
    again.close()


def _fresh(i: int) -> fleet_pb2.FeedbackRecord:
    """A record created now: it lingers."""
    record = _record(i)
    record.created_unix_ms = int(time.time() * 1000)
    return record


async def test_delivery_lingers_until_a_batch_is_full_or_the_oldest_has_waited_linger_s(outbox: Outbox) -> None:
    """Each call is a file in the cloud's store: a record is not sent alone as soon as it is added."""
    registry = CollectorRegistry()
    sink = ScriptedSink([])
    delivery = _delivery(outbox, sink, registry, batch_size=3, linger_s=0.4)
    running = asyncio.ensure_future(delivery.run())
    try:
        for i in range(4):
            outbox.add(_fresh(i))
            delivery.wake()
            await asyncio.sleep(0.05)
        assert sink.sent == [["r000", "r001", "r002"]], "a full batch leaves at once"
        started = time.monotonic()
        while outbox.depth:
            await asyncio.sleep(0.01)
        assert sink.sent[1:] == [["r003"]] and 0.2 < time.monotonic() - started < 1.0, "the rest when it is due"
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_lingering_delivery_stops_when_cancelled_even_as_a_record_wakes_it(outbox: Outbox) -> None:
    """The daemon's stop: the last records commit (waking delivery), then it is cancelled."""
    outbox.add(_fresh(0))
    delivery = _delivery(outbox, ScriptedSink([]), CollectorRegistry(), batch_size=10, linger_s=60)
    running = asyncio.ensure_future(delivery.run())
    await asyncio.sleep(0.05)  # lingering
    outbox.add(_fresh(1))
    delivery.wake()
    running.cancel()
    await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 1)
    assert running.cancelled()


async def test_a_record_kept_across_a_restart_is_not_held_again(outbox: Outbox) -> None:
    outbox.add(_record(0))  # created long ago: it waited its linger_s before the restart
    registry = CollectorRegistry()
    sink = ScriptedSink([])
    await _deliver_until(_delivery(outbox, sink, registry, batch_size=10, linger_s=60), lambda: outbox.depth == 0)
    assert sink.sent == [["r000"]]


async def test_flushing_at_stop_sends_lingering_records_at_once_and_keeps_what_fails(outbox: Outbox) -> None:
    for i in range(3):
        outbox.add(_fresh(i))
    sink = ScriptedSink([])
    await asyncio.wait_for(_delivery(outbox, sink, CollectorRegistry(), batch_size=2, linger_s=60).flush(5), 1)
    assert sink.sent == [["r000", "r001"], ["r002"]] and outbox.depth == 0
    outbox.add(_fresh(4))
    down = ScriptedSink([grpc.StatusCode.UNAVAILABLE] * 10)
    await asyncio.wait_for(_delivery(outbox, down, CollectorRegistry(), batch_size=2, linger_s=60).flush(5), 1)
    assert down.sent == [["r004"]] and _ids(outbox.oldest(10)) == ["r004"], "one try, then kept for the next start"


class RefusesReceipt(ScriptedSink):
    """Refuses any batch holding `invalid`, as the fleet refuses a receipt it cannot verify."""

    async def report_feedback(self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float) -> fleet_pb2.ReportFeedbackResponse:
        self.sent.append(_ids(records))
        if self.invalid in _ids(records):
            at = _ids(records).index(self.invalid)
            raise CloudCallError(grpc.StatusCode.PERMISSION_DENIED, f"records[{at}].receipt: signed under key 'x'")
        return fleet_pb2.ReportFeedbackResponse(stored=len(records))


async def test_an_escalation_whose_receipt_the_cloud_refuses_is_moved_aside_and_the_others_delivered(
    outbox: Outbox
) -> None:
    """A receipt signed under a key the cloud no longer holds will not verify later either."""
    for i in range(4):
        outbox.add(_record(i))
    registry = CollectorRegistry()
    await _deliver_until_empty(outbox, RefusesReceipt([], invalid="r002"), registry, batch_size=4)
    assert [(r.record_id, why) for r, why in outbox.dead()] == [
        ("r002", "cloud answered PERMISSION_DENIED: records[0].receipt: signed under key 'x'")]
    assert registry.get_sample_value("tandem_edge_feedback_delivered_total") == 3


async def test_any_other_permission_denied_keeps_the_batch_for_a_retry(outbox: Outbox) -> None:
    outbox.add(_record(0))
    sink = ScriptedSink([grpc.StatusCode.PERMISSION_DENIED])
    await _deliver_until(_delivery(outbox, sink, CollectorRegistry(), batch_size=4), lambda: outbox.depth == 0)
    assert sink.sent == [["r000"]] * 2 and outbox.dead() == []


async def test_a_cloud_answer_is_kept_as_its_receipt_under_the_id_of_the_record_inside(outbox: Outbox) -> None:
    """The text inside is what the edge escalated (redacted then); the receipt stays as signed."""
    inner = fleet_pb2.FeedbackRecord(record_id="esc/dev-1/abc", kind=fleet_pb2.ESCALATION, text="card 4111 1111 1111 1111")
    receipt = common_pb2.Receipt(record=inner.SerializeToString(), mac=b"m" * 32, key_id="k")
    recorder = _recorder(outbox, CollectorRegistry())
    assert await recorder.record_receipt("t", "req-1", receipt) == "esc/dev-1/abc"
    (stored,) = outbox.oldest(1)
    assert (stored.record_id, stored.kind, stored.request_id, stored.task, stored.device_id) == (
        "esc/dev-1/abc", fleet_pb2.ESCALATION, "req-1", "t", "dev-1")
    assert stored.receipt == receipt and stored.created_unix_ms > 1_700_000_000_000 and not stored.text


async def test_a_cloud_answer_without_a_receipt_is_counted_and_keeps_nothing(outbox: Outbox) -> None:
    registry = CollectorRegistry()
    recorder = _recorder(outbox, registry)
    for request_id in ("a", "b"):
        assert await recorder.record_receipt("t", request_id, common_pb2.Receipt()) is None
    assert await recorder.record_receipt("t", "c", common_pb2.Receipt(record=b"\xff not a record")) is None
    assert outbox.depth == 0
    assert registry.get_sample_value(
        "tandem_edge_feedback_refused_total", {"task": "t", "kind": "ESCALATION", "reason": "no_receipt"}) == 3
