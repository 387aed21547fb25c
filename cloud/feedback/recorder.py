"""Sending an expert's answered escalations to the feedback store in the background, in
batches, off the request path."""

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

from tandem.backoff import Backoff
from tandem.v1 import expert_pb2, fleet_pb2

log = logging.getLogger(__name__)

Send = Callable[[list[fleet_pb2.FeedbackRecord]], Awaitable[object]]


class EscalationRecorder:
    """`add` only queues: a background task sends `batch_size` records at once, or whatever is
    pending every `interval_s`. A failed send is logged and retried with capped, jittered
    exponential backoff (`tandem.backoff.Backoff`) for as long as the replica runs (a fleet
    application restart loses nothing; a replica that dies loses what it holds); at shutdown a batch gets `retries` attempts, then is
    dropped (logged). Records beyond `max_pending` are dropped (logged) too, so an unreachable
    store costs bounded memory and never an answer."""

    def __init__(self, send: Send, batch_size: int = 64, interval_s: float = 1.0, retries: int = 3,
                 backoff_s: float = 0.5, max_pending: int = 10_000, max_backoff_s: float = 30.0,
                 send_timeout_s: float = 30.0) -> None:
        self._send = send
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._retries = retries
        self._backoff = Backoff(backoff_s, max_backoff_s)
        self._max_pending = max_pending
        self._send_timeout_s = send_timeout_s
        self._pending: list[fleet_pb2.FeedbackRecord] = []
        self._dropped = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def add(self, record: fleet_pb2.FeedbackRecord) -> None:
        """Queues a record; never blocks or raises. Call from the event loop."""
        if len(self._pending) >= self._max_pending:
            if not self._dropped:
                log.error("feedback: %d records pending, dropping new ones until sends succeed", len(self._pending))
            self._dropped += 1
            return
        self._pending.append(record)
        if len(self._pending) >= self._batch_size:
            self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Sends everything pending, then stops."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while self._pending or not self._closing:
            if not self._closing and len(self._pending) < self._batch_size:
                try:
                    await asyncio.wait_for(self._wake.wait(), self._interval_s)
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._pending:
                await self._send_batch()

    async def _send_batch(self) -> None:
        # `add` only appends, so the batch stays at the head of `_pending` until it is removed.
        batch = self._pending[: self._batch_size]
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.wait_for(self._send(batch), self._send_timeout_s)
                break
            except Exception:
                log.warning("feedback: sending %d records failed (attempt %d)", len(batch), attempt, exc_info=True)
                if self._closing and attempt >= self._retries:
                    log.error("feedback: dropped %d records (%s, ...) at shutdown after %d failed attempts",
                              len(batch), batch[0].record_id, attempt)
                    break
                await asyncio.sleep(self._backoff.next_wait_s())
        self._backoff.reset()  # each batch starts with short waits, sent or dropped
        del self._pending[: len(batch)]
        if self._dropped:
            log.error("feedback: dropped %d records while %d were pending", self._dropped, self._max_pending)
            self._dropped = 0


def escalation_record(request: expert_pb2.EscalateRequest, response: expert_pb2.EscalateResponse,
                      answered_unix_ms: int) -> fleet_pb2.FeedbackRecord:
    """What the cloud keeps of an escalation it answered; `request.device_id` is the verified
    caller. Its id, `esc/<device>/<hash of the request id>`: an escalation recorded twice is
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
    )
