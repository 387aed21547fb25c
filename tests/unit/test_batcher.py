import asyncio
import threading

import numpy as np
import pytest

from edge.batcher import MicroBatcher
from edge.errors import Overloaded


class RecordingModel:
    """A pure function of the text (its length), slow enough for requests to queue."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.release.wait(timeout=5)
        self.batches.append(texts)
        return np.array([[len(t), 0.0] for t in texts])


async def test_lone_request_runs_immediately_as_batch_of_one() -> None:
    model = RecordingModel()
    model.release.set()
    batcher = MicroBatcher(model, max_batch=8, max_queue=64)
    batcher.start()
    result = await batcher.submit("abc")
    await batcher.close()
    assert result.batch_size == 1 and result.probs[0] == 3
    assert model.batches == [["abc"]]


async def test_requests_queued_behind_a_busy_model_run_together_up_to_max_batch() -> None:
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch=4, max_queue=64)
    batcher.start()
    texts = ["x" * n for n in range(1, 11)]
    pending = [asyncio.ensure_future(batcher.submit(texts[0]))]
    await asyncio.sleep(0.05)  # the first request is now inside the model
    pending += [asyncio.ensure_future(batcher.submit(t)) for t in texts[1:]]
    await asyncio.sleep(0.05)  # the rest queue behind it
    model.release.set()
    results = await asyncio.gather(*pending)
    await batcher.close()
    # Each caller gets its own row back, whatever batch it ran in.
    assert [r.probs[0] for r in results] == list(range(1, 11))
    assert [len(b) for b in model.batches] == [1, 4, 4, 1]
    assert all(r.queue_s >= 0 and r.inference_s >= 0 for r in results)


async def test_model_error_reaches_every_caller_of_the_batch_and_the_batcher_survives() -> None:
    calls = 0

    def flaky(texts: list[str]) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("onnx exploded")
        return np.ones((len(texts), 2))

    batcher = MicroBatcher(flaky, max_batch=4, max_queue=64)
    batcher.start()
    with pytest.raises(RuntimeError, match="onnx exploded"):
        await batcher.submit("a")
    assert (await batcher.submit("b")).probs.tolist() == [1.0, 1.0]
    await batcher.close()


async def test_a_full_queue_refuses_at_once_naming_the_limit_and_answers_what_it_took() -> None:
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch=8, max_queue=2)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.05)  # "a" is inside the model: the queue is empty
    queued = [asyncio.ensure_future(batcher.submit(t)) for t in ("bb", "ccc")]
    await asyncio.sleep(0)  # both are queued now
    with pytest.raises(Overloaded, match="max_queue is 2"):
        await batcher.submit("dddd")
    model.release.set()
    results = await asyncio.gather(running, *queued)
    await batcher.close()
    assert [r.probs[0] for r in results] == [1, 2, 3]
    assert "dddd" not in [t for batch in model.batches for t in batch]


async def test_a_request_whose_caller_gave_up_is_not_run() -> None:
    model = RecordingModel()
    batcher = MicroBatcher(model, max_batch=8, max_queue=8)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.05)  # "a" is inside the model
    abandoned = asyncio.ensure_future(batcher.submit("given up"))
    kept = asyncio.ensure_future(batcher.submit("kept"))
    await asyncio.sleep(0)
    abandoned.cancel()  # as grpc.aio does to the handler when its caller cancels the RPC
    model.release.set()
    answered = await asyncio.gather(running, kept)
    await batcher.close(drain=True)  # returns: the skipped request was accounted for in the queue
    assert model.batches == [["a"], ["kept"]]
    assert [r.probs[0] for r in answered] == [1, 4] and abandoned.cancelled()
