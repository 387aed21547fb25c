"""What serves one task: a student with its batcher, swapped atomically, and the policy."""

from dataclasses import dataclass

from edge.batcher import MicroBatcher
from edge.policy import Policy
from edge.student import Student


@dataclass(frozen=True)
class Serving:
    """A student and the batcher running it: a request takes both from one `Serving`, so
    its prediction and its label names come from the same version, even across a swap."""

    student: Student
    batcher: MicroBatcher

    @classmethod
    def start(cls, student: Student, max_batch: int) -> "Serving":
        batcher = MicroBatcher(student.predict, max_batch)
        batcher.start()
        return cls(student, batcher)


class TaskRuntime:
    """A task's `Serving` and its policy. Fleet mode gives many runtimes one `Serving`."""

    def __init__(self, serving: Serving, policy: Policy, max_batch: int) -> None:
        self.serving = serving
        self.policy = policy
        self._max_batch = max_batch

    async def swap(self, student: Student) -> None:
        """Serves `student` from now on; returns once the replaced one has answered its queue.

        One assignment on the event loop, so atomic: a request that read the old `serving`
        has already queued on the old batcher (`submit` enqueues before its first await),
        and the old batcher answers all it holds before it stops.
        """
        old = self.serving
        self.serving = Serving.start(student, self._max_batch)
        await old.batcher.close(drain=True)

    async def close(self) -> None:
        await self.serving.batcher.close()
