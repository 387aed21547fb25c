import asyncio
import logging

import pytest

from cloud.feedback.recorder import EscalationRecorder
from tandem.v1 import fleet_pb2


def _records(n: int) -> list[fleet_pb2.FeedbackRecord]:
    return [fleet_pb2.FeedbackRecord(record_id=f"r{i}") for i in range(n)]


class Store:
    """A send target that fails its first `failures` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []

    async def send(self, records: list[fleet_pb2.FeedbackRecord]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("fleet down")
        self.batches.append([r.record_id for r in records])


async def test_a_full_batch_is_sent_at_once_and_the_rest_on_close() -> None:
    store = Store()
    recorder = EscalationRecorder(store.send, batch_size=3, interval_s=60)
    for record in _records(4):
        recorder.add(record)
    await asyncio.sleep(0.05)
    assert store.batches == [["r0", "r1", "r2"]]
    await recorder.close()
    assert store.batches == [["r0", "r1", "r2"], ["r3"]]


async def test_a_partial_batch_is_sent_after_the_interval() -> None:
    store = Store()
    recorder = EscalationRecorder(store.send, batch_size=64, interval_s=0.05)
    recorder.add(_records(1)[0])
    await asyncio.sleep(0.2)
    assert store.batches == [["r0"]]
    await recorder.close()


async def test_failed_sends_are_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    store = Store(failures=2)
    recorder = EscalationRecorder(store.send, batch_size=2, retries=3, backoff_s=0.01)
    for record in _records(2):
        recorder.add(record)
    await recorder.close()
    assert store.batches == [["r0", "r1"]]
    failures = [r for r in caplog.records if "attempt" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info and "fleet down" in str(r.exc_info[1]) for r in failures)


async def test_while_running_a_failed_batch_is_retried_until_the_store_is_back() -> None:
    store = Store(failures=6)  # more failures than `retries`: a fleet restart, not a bad batch
    recorder = EscalationRecorder(store.send, batch_size=1, retries=2, backoff_s=0.001, max_backoff_s=0.01, interval_s=0.01)
    for record in _records(2):
        recorder.add(record)
    for _ in range(200):
        if len(store.batches) == 2:
            break
        await asyncio.sleep(0.01)
    assert store.batches == [["r0"], ["r1"]]
    await recorder.close()


async def test_at_shutdown_a_batch_is_dropped_with_an_error_after_its_last_attempt(caplog: pytest.LogCaptureFixture) -> None:
    store = Store(failures=2)
    recorder = EscalationRecorder(store.send, batch_size=1, retries=2, backoff_s=0.01, interval_s=60)
    for record in _records(2):
        recorder.add(record)
    await recorder.close()
    assert store.batches == [["r1"]]
    assert any(r.levelno == logging.ERROR and "dropped 1 records (r0, ...) at shutdown after 2 failed attempts" in r.getMessage()
               for r in caplog.records)


async def test_a_hung_send_times_out_and_is_retried() -> None:
    calls = 0

    async def send(records: list[fleet_pb2.FeedbackRecord]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()

    recorder = EscalationRecorder(send, batch_size=1, backoff_s=0.001, send_timeout_s=0.05)
    recorder.add(_records(1)[0])
    await asyncio.wait_for(recorder.close(), timeout=5)
    assert calls == 2


async def test_add_never_waits_for_a_hung_store_and_memory_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    hung = asyncio.Event()

    async def send(records: list[fleet_pb2.FeedbackRecord]) -> None:
        await hung.wait()

    recorder = EscalationRecorder(send, batch_size=2, max_pending=3)
    for record in _records(5):
        recorder.add(record)
    assert any("dropping new ones" in r.getMessage() for r in caplog.records)
    hung.set()
    await recorder.close()
    assert any("dropped 2 records while 3 were pending" in r.getMessage() for r in caplog.records)
