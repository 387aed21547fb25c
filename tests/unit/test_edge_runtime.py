"""A model swap is bounded: a replaced version whose model run hangs cannot hold the swap."""

import asyncio
import threading

import numpy as np

from edge.config import PolicyConfig
from edge.policy import Policy
from edge.runtime import Serving, TaskRuntime


class FakeStudent:
    """Answers its own version's marker; `predict` blocks while `blocked` is set."""

    def __init__(self, version: str, marker: float) -> None:
        self.version = version
        self.labels = ["a", "b"]
        self.marker = marker
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def predict(self, texts: list[str]) -> np.ndarray:
        self.entered.set()
        self.release.wait(timeout=30)
        return np.full((len(texts), 2), self.marker)


def _runtime(student: FakeStudent) -> TaskRuntime:
    return TaskRuntime(Serving.start(student, max_batch=4, max_queue=16), Policy(PolicyConfig()), 4, 16)  # type: ignore[arg-type]


async def test_a_swap_whose_old_version_hangs_returns_after_the_timeout_and_the_new_one_serves() -> None:
    old, new = FakeStudent("v1", 1.0), FakeStudent("v2", 2.0)
    old.release.clear()  # the old version's model run hangs
    runtime = _runtime(old)
    stuck = asyncio.ensure_future(runtime.serving.batcher.submit("queued before the swap"))
    await asyncio.to_thread(old.entered.wait, 5)
    drained = await runtime.swap(new, drain_timeout_s=0.05)  # type: ignore[arg-type]
    assert drained is False and runtime.serving.student is new
    assert (await runtime.serving.batcher.submit("after")).probs[0] == 2.0
    old.release.set()  # the hung run returns: the old batcher still answers what it took
    assert (await stuck).probs[0] == 1.0
    await runtime.close()


async def test_a_swap_waits_for_the_old_version_to_answer_its_queue() -> None:
    old, new = FakeStudent("v1", 1.0), FakeStudent("v2", 2.0)
    runtime = _runtime(old)
    queued = asyncio.ensure_future(runtime.serving.batcher.submit("queued before the swap"))
    await asyncio.sleep(0)
    assert await runtime.swap(new, drain_timeout_s=30) is True  # type: ignore[arg-type]
    assert queued.done() and queued.result().probs[0] == 1.0
    await runtime.close()
