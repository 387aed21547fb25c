"""Delivering the outbox to the cloud: oldest first, in batches, with backoff.

A batch is deleted only after the cloud's OK, so a crash at any point re-sends it at worst;
the store keeps one copy per record_id, so at-least-once delivery stores each record once.
A record the cloud refuses as INVALID_ARGUMENT is moved to the outbox's `dead` table.
"""

import asyncio
import logging
from typing import Protocol

import grpc

from edge.config import FeedbackConfig
from edge.errors import CloudCallError
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


# Statuses a batch can earn by its content or size: smaller batches may get through.
SPLITTABLE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Delivery:
    def __init__(self, outbox: Outbox, sink: FeedbackSink, cfg: FeedbackConfig, metrics: EdgeMetrics) -> None:
        self._outbox = outbox
        self._sink = sink
        self._cfg = cfg
        self._metrics = metrics
        self._added = asyncio.Event()

    def wake(self) -> None:
        """New records are waiting."""
        self._added.set()

    async def run(self) -> None:
        """Delivers until cancelled; waits for `wake` while the outbox is empty."""
        # Equal jitter: never retry at once, and edges that lost the cloud together do not all
        # come back at the same instant.
        backoff = Backoff(self._cfg.min_backoff_s, self._cfg.max_backoff_s, jitter="equal")
        while True:
            self._added.clear()  # before reading: a record added after the read sets it again
            try:
                batch = await asyncio.to_thread(self._outbox.oldest, self._cfg.batch_size)
                if not batch:
                    await self._added.wait()
                    continue
                delivered = await self._deliver(batch)
            except Exception:  # an unreadable outbox, a bug: delivery must outlive it, as the records do
                log.exception("feedback delivery failed; retrying after a backoff")
                delivered = False
            if delivered:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next_wait_s())

    async def _deliver(self, batch: list[fleet_pb2.FeedbackRecord]) -> bool:
        """Sends one batch; True when all of it left the outbox (acknowledged or moved aside)."""
        try:
            answer = await self._sink.report_feedback(batch, self._cfg.deadline_ms / 1000)
        except CloudCallError as exc:
            if exc.code not in SPLITTABLE:
                # Every other failure says nothing against the records: keep them and retry.
                log.warning("feedback delivery of %d records failed, will retry: %s", len(batch), exc)
                self._metrics.delivery_failures.labels(exc.code.name).inc()
                return False
            if len(batch) > 1:
                # One invalid record (or one batch too large for the cloud) refuses it all:
                # halve until the bad record is alone, so the valid ones still go through.
                half = len(batch) // 2
                return await self._deliver(batch[:half]) and await self._deliver(batch[half:])
            if exc.code != grpc.StatusCode.INVALID_ARGUMENT:  # a lone record "too large": the cloud is busy
                self._metrics.delivery_failures.labels(exc.code.name).inc()
                return False
            # Retrying would fail the same way forever and hold up every record behind it.
            log.error("cloud refused feedback record %s as invalid; moved to the outbox's dead table: %s",
                      batch[0].record_id, exc)
            await asyncio.to_thread(self._outbox.bury, batch, str(exc))
            self._metrics.feedback_dead.inc()
            return True
        await asyncio.to_thread(self._outbox.remove, [r.record_id for r in batch])
        self._metrics.feedback_delivered.inc(len(batch))
        log.debug("delivered %d feedback records (%d stored, %d already stored)", len(batch),
                  answer.stored, answer.duplicates)
        return True
