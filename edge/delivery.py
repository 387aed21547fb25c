"""Delivering the outbox to the cloud: oldest first, in batches, with backoff.

A batch leaves once `batch_size` records wait or the oldest has waited `linger_s`: each
ReportFeedback call is a file in the cloud's store. A batch is deleted only after the
cloud's OK, so a crash at any point re-sends it at worst; the store keeps one copy per
record_id, so at-least-once delivery stores each record once. A lone record the cloud
refuses as INVALID_ARGUMENT is either a configuration the cloud lacks (its task or label:
the cloud checks those against its own config, which may be back in ten minutes), kept and
retried later behind the others, or a broken record, moved to the outbox's `dead` table for
good. So is an escalation whose receipt the cloud refuses (PERMISSION_DENIED naming it: a
receipt signed under a key the cloud no longer holds will not verify later either).
"""

import asyncio
import logging
import re
import time
from typing import Protocol

import grpc

from edge.config import FeedbackConfig
from edge.errors import CloudCallError
from edge.health import LoopHealth
from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from tandem.backoff import Backoff
from tandem.v1 import fleet_pb2

log = logging.getLogger(__name__)


class FeedbackSink(Protocol):
    async def report_feedback(
        self, records: list[fleet_pb2.FeedbackRecord], timeout_s: float
    ) -> fleet_pb2.ReportFeedbackResponse:
        """Stores the records durably or raises CloudCallError."""


# What gRPC says of a message over the receiver's size limit (RESOURCE_EXHAUSTED, like a full
# queue, which smaller batches would only make worse).
TOO_LARGE = "larger than max"
# Record fields the cloud checks against its configuration, not against the contract: the
# edge cannot check them itself, and the cloud may know them later (a task being deployed).
CONFIGURATION_FIELDS = frozenset({"task", "label"})
# The cloud names the refused field as a path, `records[i].<field>` or deeper
# (`records[i].edge.label`, `records[i].distribution[j].label`; contract.FieldError).
REFUSED_FIELD = re.compile(r"records\[\d+\]\.([\w.\[\]]+):")
# The field of an ESCALATION record that the cloud verifies (`records[i].receipt` or deeper).
RECEIPT_FIELD = "receipt"


class Delivery:
    def __init__(
        self, outbox: Outbox, sink: FeedbackSink, cfg: FeedbackConfig, metrics: EdgeMetrics, health: LoopHealth
    ) -> None:
        self._outbox = outbox
        self._sink = sink
        self._cfg = cfg
        self._metrics = metrics
        self._health = health
        self._added = asyncio.Event()

    def wake(self) -> None:
        """New records are waiting."""
        self._added.set()

    async def run(self) -> None:
        """Delivers until cancelled; waits for `wake` while the outbox is empty."""
        # Equal jitter: never retry at once, and edges that lost the cloud together do not all
        # come back at the same instant.
        backoff = Backoff(self._cfg.min_backoff_s, self._cfg.max_backoff_s, jitter="equal")
        raised = None  # the last attempt's exception, while attempts keep raising it
        while True:
            self._added.clear()  # before reading: a record added after the read sets it again
            try:
                batch = await asyncio.to_thread(self._outbox.oldest, self._cfg.batch_size)
                if not batch:
                    await self._added.wait()
                    continue
                if len(batch) < self._cfg.batch_size and await self._lingered(batch[0]):
                    continue  # read again: more records, or the same ones, now due
                failure = await self._deliver(batch)
            except Exception as exc:  # an unreadable outbox, a bug: delivery must outlive it, as the records do
                failure = f"{type(exc).__name__}: {exc}"
                if failure != raised:  # once per episode: a full disk fails every attempt alike
                    log.exception("feedback delivery failed; retrying after a backoff (not logged again while "
                                  "attempts fail alike)")
                raised = failure
            else:
                raised = None
            if failure is None:
                backoff.reset()
                await self._health.succeeded()
            else:
                await self._health.failed(failure)
                await asyncio.sleep(backoff.next_wait_s())

    async def flush(self, timeout_s: float) -> None:
        """Sends what waits at once, lingering no more, until the outbox is empty, a delivery
        fails or `timeout_s` has passed (the daemon stops: `run` is cancelled by then). What
        is left stays in the outbox for the next start."""
        try:
            async with asyncio.timeout(timeout_s):
                while batch := await asyncio.to_thread(self._outbox.oldest, self._cfg.batch_size):
                    if await self._deliver(batch) is not None:
                        return
        except TimeoutError:
            log.warning("feedback: %d records not delivered within %g s of stopping; kept for the next start",
                        self._outbox.depth, timeout_s)

    async def _lingered(self, oldest: fleet_pb2.FeedbackRecord) -> bool:
        """Waits, while fewer than `batch_size` records wait, until the oldest has waited
        `linger_s` (by its creation time: a record kept across a restart is due at once);
        whether it waited at all. Wakes at each new record only to compare a count."""
        age_s = time.time() - oldest.created_unix_ms / 1000
        # A clock set back must not hold records longer than linger_s.
        left_s = min(self._cfg.linger_s - age_s, self._cfg.linger_s)
        if left_s <= 0:
            return False
        deadline = time.monotonic() + left_s
        while True:
            self._added.clear()  # before counting: a record added after the count sets it again
            left_s = deadline - time.monotonic()
            if self._outbox.depth >= self._cfg.batch_size or left_s <= 0:
                return True
            try:
                # Not wait_for: on 3.11 it swallows a cancellation that comes with the wake-up.
                async with asyncio.timeout(left_s):
                    await self._added.wait()
            except TimeoutError:
                return True

    async def _deliver(self, batch: list[fleet_pb2.FeedbackRecord]) -> str | None:
        """Sends one batch; None when all of it left the outbox (acknowledged or moved aside),
        else why not."""
        try:
            answer = await self._sink.report_feedback(batch, self._cfg.deadline_ms / 1000)
        except CloudCallError as exc:
            if not _splittable(exc):
                # Every other failure says nothing against the records: keep them and retry.
                log.warning("feedback delivery of %d records failed, will retry: %s", len(batch), exc)
                self._metrics.delivery_failures.labels(exc.code.name).inc()
                return str(exc)
            if len(batch) > 1:
                # One invalid record (or one batch too large for the cloud) refuses it all:
                # halve until the bad record is alone, so the valid ones still go through.
                half = len(batch) // 2
                first = await self._deliver(batch[:half])
                second = await self._deliver(batch[half:])  # whatever the first half earned
                return first or second
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a lone record "too large": the cloud is busy
                self._metrics.delivery_failures.labels(exc.code.name).inc()
                return str(exc)
            return await self._refused(batch[0], exc)
        await asyncio.to_thread(self._outbox.remove, [r.record_id for r in batch])
        self._metrics.feedback_delivered.inc(len(batch))
        log.debug("delivered %d feedback records (%d stored, %d already stored)", len(batch),
                  answer.stored, answer.duplicates)
        return None

    async def _refused(self, record: fleet_pb2.FeedbackRecord, exc: CloudCallError) -> str | None:
        """A lone record refused as invalid, or its receipt: deferred if the cloud lacks its
        task or label, else buried (retrying would fail the same way forever and hold up every
        record behind it)."""
        # The path's last field: a label is the cloud's configuration wherever it sits.
        field = _refused_path(exc).rsplit(".", 1)[-1]
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT and field in CONFIGURATION_FIELDS:
            log.warning("the cloud does not know the %s of feedback record %s (its configuration?); kept, and "
                        "retried after the others: %s", field, record.record_id, exc)
            await asyncio.to_thread(self._outbox.defer, record.record_id)
            self._metrics.feedback_deferred.labels(field).inc()
            return str(exc)
        log.error("cloud refused feedback record %s for good; moved to the outbox's dead table: %s",
                  record.record_id, exc)
        dropped = await asyncio.to_thread(self._outbox.bury, [record], str(exc))
        self._metrics.feedback_dead.inc()
        if dropped:
            log.warning("dead table over max_dead (%d): dropped its %d oldest records", self._cfg.max_dead, dropped)
            self._metrics.dead_dropped.inc(dropped)
        return None


def _splittable(exc: CloudCallError) -> bool:
    """Whether smaller batches may get through: the batch was refused for its content (a
    record's field, or an escalation's receipt) or size."""
    if exc.code == grpc.StatusCode.PERMISSION_DENIED:
        return _refused_path(exc).split(".", 1)[0] == RECEIPT_FIELD
    return exc.code == grpc.StatusCode.INVALID_ARGUMENT or (
        exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE in exc.details
    )


def _refused_path(exc: CloudCallError) -> str:
    """The refused field's path inside its record, indexes dropped (`edge.label`,
    `receipt.device_id`); empty if the cloud named none."""
    match = REFUSED_FIELD.match(exc.details)
    return re.sub(r"\[\d+\]", "", match.group(1)) if match else ""
