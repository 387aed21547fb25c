"""What serves one task: a student with its batcher, swapped atomically, and the policy."""

import asyncio
import logging
from dataclasses import dataclass

from edge.batcher import MicroBatcher
from edge.policy import Policy
from edge.student import Student

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Serving:
    """A student and the batcher running it: a request takes both from one `Serving`, so
    its prediction and its label names come from the same version, even across a swap."""

    student: Student
    batcher: MicroBatcher

    @classmethod
    def start(cls, student: Student, max_batch: int, max_queue: int) -> "Serving":
        batcher = MicroBatcher(student.predict, max_batch, max_queue)
        batcher.start()
        return cls(student, batcher)


class TaskRuntime:
    """A task's `Serving` and its policy. Fleet mode gives many runtimes one `Serving`."""

    def __init__(self, serving: Serving, policy: Policy, max_batch: int, max_queue: int) -> None:
        self.serving = serving
        self.policy = policy
        self._max_batch = max_batch
        self._max_queue = max_queue
        # Replaced batchers still answering their queue, by the task that drains each.
        self._draining: dict[asyncio.Task[None], MicroBatcher] = {}

    async def swap(self, student: Student, drain_timeout_s: float) -> bool:
        """Serves `student` from now on; True once the replaced one has answered its queue,
        False if that took longer than `drain_timeout_s` (it then finishes on its own).

        One assignment on the event loop, so atomic: a request that read the old `serving`
        has already queued on the old batcher (`submit` enqueues before its first await),
        and the old batcher answers all it holds before it stops.
        """
        old = self.serving
        self.serving = Serving.start(student, self._max_batch, self._max_queue)
        drain = asyncio.get_running_loop().create_task(old.batcher.close(drain=True))
        try:
            # Shielded: a hung model run must not hold the caller (the updater), but the old
            # batcher must still answer its queue if the run ever returns.
            await asyncio.wait_for(asyncio.shield(drain), drain_timeout_s)
        except TimeoutError:
            self._draining[drain] = old.batcher
            drain.add_done_callback(lambda task: self._draining.pop(task, None))
            return False
        return True

    async def close(self) -> None:
        """Stops the serving batcher, and replaced ones still draining (their callers get errors)."""
        draining = dict(self._draining)
        for drain in draining:
            drain.cancel()
        await asyncio.gather(*draining, return_exceptions=True)
        # A cancelled drain left its batcher's worker running: stop it, as the serving one.
        for batcher in [*draining.values(), self.serving.batcher]:
            await batcher.close()
