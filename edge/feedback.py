"""Recording feedback: redact, stamp, commit to the outbox, wake the delivery loop.

The recorder is the only writer of the outbox, so redaction here covers everything stored,
but for the cloud's receipts: the text inside one is what the edge escalated, redacted
before it left the device, and a receipt is kept exactly as the cloud signed it.
"""

import asyncio
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import Literal

import numpy as np

from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from edge.redact import Redactor
from google.protobuf.message import DecodeError

from tandem.v1 import common_pb2, fleet_pb2

log = logging.getLogger(__name__)

AuditWeighting = Literal["uniform", "margin"]
# The least weight of a local answer under margin weighting: confident mistakes, which the
# retrainer needs most, must still have a chance of being audited.
MIN_AUDIT_WEIGHT = 0.05
# Local answers the running mean of weights follows (an exponential mean over about this
# many): enough to be steady, few enough to follow a new student within minutes of traffic.
AUDIT_MEAN_WINDOW = 1000


def top_margin(probs: np.ndarray) -> float:
    """p1 - p2, the gap between the two most probable labels (p1 for a single label)."""
    if len(probs) < 2:
        return float(probs.max())
    second, first = np.partition(probs, -2)[-2:]
    return float(first - second)


class AuditSampler:
    """Which local answers of one task become AUDIT samples: a `rate` share of them in the long
    run, each drawn with probability rate * (rate + (1 - rate) * w / mean_w), w its weight and
    mean_w the running mean of recent weights. In effect a `rate` share of the samples is
    uniform and the rest proportional to w: at a budget of a few percent nearly all weighted,
    and a rate of 1 still audits every answer. (Less than `rate` only where the probability
    would exceed 1: large rates, very uneven weights.)"""

    def __init__(self, rate: float, weighting: AuditWeighting, chance: Callable[[], float] = random.random,
                 window: int = AUDIT_MEAN_WINDOW) -> None:
        self._rate = rate
        self._weighting = weighting
        self._chance = chance
        self._window = window
        self._mean: float | None = None

    def weight(self, margin: float) -> float:
        """1 under uniform weighting; under margin weighting, how unsure the answer was."""
        return 1.0 if self._weighting == "uniform" else max(1.0 - margin, MIN_AUDIT_WEIGHT)

    def due(self, margin: float) -> bool:
        """Whether the local answer with top-2 `margin` is to be audited."""
        weight = self.weight(margin)
        self._mean = weight if self._mean is None else self._mean + (weight - self._mean) / self._window
        return self._chance() < self._rate * (self._rate + (1 - self._rate) * weight / self._mean)


class FeedbackRecorder:
    def __init__(
        self,
        outbox: Outbox,
        redact: Redactor,
        device_id: str,
        audit_rate: float,
        metrics: EdgeMetrics,
        on_added: Callable[[], None],
        chance: Callable[[], float] = random.random,
        audit_weighting: AuditWeighting = "margin",
    ) -> None:
        self._outbox = outbox
        self._redact = redact
        self._device_id = device_id
        self._audit_rate = audit_rate
        self._audit_weighting: AuditWeighting = audit_weighting
        self._audits: dict[str, AuditSampler] = {}
        self._metrics = metrics
        self._on_added = on_added
        self._chance = chance
        self._full = False
        self._receiptless = False
        self._failing = False
        self._pending: set[asyncio.Task[str | None]] = set()
        self._queue: list[tuple[fleet_pb2.FeedbackRecord, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    def audit_due(self, task: str, margin: float) -> bool:
        """Whether to record a local answer of `task` with top-2 `margin` as an AUDIT sample: an
        `audit_rate` share of each task's local answers, weighted by `audit_weighting`."""
        sampler = self._audits.get(task)
        if sampler is None:
            sampler = self._audits[task] = AuditSampler(self._audit_rate, self._audit_weighting, self._chance)
        return sampler.due(margin)

    async def record(
        self,
        kind: fleet_pb2.FeedbackKind,
        task: str,
        text: str,
        request_id: str,
        label_set_version: int,
        edge: common_pb2.EdgePrediction | None = None,
        label: str = "",
    ) -> str | None:
        """Commits a redacted record; its record_id, or None if the outbox refused it
        (full, or a storage error), which is counted and logged here. `label_set_version`: that
        of the student whose labels `edge` and `label` come from."""
        return await self._commit(fleet_pb2.FeedbackRecord(
            record_id=uuid.uuid4().hex,
            request_id=request_id,
            task=task,
            kind=kind,
            text=self._redact(text),
            edge=edge,
            label=label,
            device_id=self._device_id,
            created_unix_ms=int(time.time() * 1000),
            label_set_version=label_set_version,
        ))

    async def record_receipt(self, task: str, request_id: str, receipt: common_pb2.Receipt) -> str | None:
        """Commits the ESCALATION record that carries the cloud's `receipt` for its answer to
        `request_id`, under the id of the record inside (the cloud stores that one, once); its
        record_id, or None if the answer came without a receipt (an empty one) or the outbox
        refused it (counted and logged here)."""
        record_id = _receipt_record_id(receipt)
        if record_id is None:
            self._metrics.feedback_refused.labels(task, "ESCALATION", "no_receipt").inc()
            if not self._receiptless:  # once: a cloud without receipts answers every escalation so
                log.warning("the cloud answered an escalation (request_id=%s) without a receipt: no ESCALATION "
                            "record kept; counted in tandem_edge_feedback_refused_total{reason=\"no_receipt\"}",
                            request_id)
            self._receiptless = True
            return None
        return await self._commit(fleet_pb2.FeedbackRecord(
            record_id=record_id,
            request_id=request_id,
            task=task,
            kind=fleet_pb2.ESCALATION,
            device_id=self._device_id,
            created_unix_ms=int(time.time() * 1000),
            receipt=receipt,
        ))

    async def _commit(self, record: fleet_pb2.FeedbackRecord) -> str | None:
        """Queues the record for the next group commit and waits for it: concurrent answers
        share one transaction, and so one sync to disk, which is what bounds how many fallbacks
        a second an edge can keep while the cloud is down."""
        committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((record, committed))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        kind_name = fleet_pb2.FeedbackKind.Name(record.kind)
        try:
            accepted = await committed
        except sqlite3.Error:
            self._refuse_failing(record, kind_name)
            return None
        if self._failing:
            log.info("feedback outbox writes succeed again")
        self._failing = False
        if not accepted:
            self._refuse_full(record.task, kind_name)
            return None
        self._full = False
        self._metrics.feedback_recorded.labels(record.task, kind_name).inc()
        self._on_added()
        return record.record_id

    async def _write(self) -> None:
        """Commits what is queued, in one transaction, until nothing is: what arrives during a
        commit goes in the next one."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                accepted = await asyncio.to_thread(self._outbox.add_many, [record for record, _ in batch])
            except sqlite3.Error as exc:
                for _, committed in batch:
                    if not committed.done():  # a cancelled caller's record is written all the same
                        committed.set_exception(exc)
                continue
            for (_, committed), ok in zip(batch, accepted, strict=True):
                if not committed.done():
                    committed.set_result(ok)

    def record_soon(self, kind: fleet_pb2.FeedbackKind, task: str, text: str, request_id: str,
                    label_set_version: int, edge: common_pb2.EdgePrediction) -> None:
        """`record` in the background: for samples whose answer should not wait for the disk."""
        pending = asyncio.get_running_loop().create_task(
            self.record(kind, task, text, request_id, label_set_version, edge))
        self._pending.add(pending)
        pending.add_done_callback(self._finished)

    async def close(self) -> None:
        """Waits for background records to be committed."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._writer is not None:
            await self._writer

    def _refuse_failing(self, record: fleet_pb2.FeedbackRecord, kind_name: str) -> None:
        self._metrics.feedback_refused.labels(record.task, kind_name, "error").inc()
        if not self._failing:  # once per episode: a failing disk fails every write
            log.exception("feedback outbox write failed; %s record %s not kept, nor others until writes succeed "
                          "again (counted in tandem_edge_feedback_refused_total{reason=\"error\"})",
                          kind_name, record.record_id)
        self._failing = True

    def _refuse_full(self, task: str, kind_name: str) -> None:
        self._metrics.feedback_refused.labels(task, kind_name, "full").inc()
        if not self._full:  # once per episode: a full outbox refuses at the request rate
            log.warning("feedback outbox full (%d records): refusing new records until the cloud takes some",
                        self._outbox.depth)
        self._full = True

    def _finished(self, pending: asyncio.Task[str | None]) -> None:
        self._pending.discard(pending)
        if not pending.cancelled() and pending.exception() is not None:
            log.error("background feedback record failed", exc_info=pending.exception())


def _receipt_record_id(receipt: common_pb2.Receipt) -> str | None:
    """The id of the record inside `receipt`, or None if it holds none. The receipt is
    otherwise opaque here: only the cloud can check it."""
    try:
        return fleet_pb2.FeedbackRecord.FromString(receipt.record).record_id or None
    except DecodeError:
        return None
