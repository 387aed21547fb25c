"""Micro-batching: requests that arrive while the model is busy go to it together next.

No timer: a lone request runs at once, so batching costs nothing at low load and only
forms when requests queue anyway. The model runs in a worker thread (ONNX Runtime
releases the GIL, so the event loop keeps accepting requests meanwhile); a batch pays
the thread hand-offs once instead of per request (`tandem bench edge` reports the daemon's
maximum throughput with and without batching).

Bounded: beyond `max_queue` waiting requests, `submit` refuses at once (Overloaded), so an
overload costs callers a fast error instead of the daemon its memory and every caller its
latency. A request whose caller gave up (its future cancelled) is never run.
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge.errors import Overloaded


@dataclass(frozen=True)
class Result:
    probs: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int


class MicroBatcher:
    def __init__(self, predict: Callable[[list[str]], np.ndarray], max_batch: int, max_queue: int) -> None:
        self._predict = predict
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[str, float, asyncio.Future[Result]]] = asyncio.Queue(max_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._worker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self, drain: bool = False) -> None:
        """Stops the worker; callers still waiting get an error instead of waiting forever.
        With `drain`, everything already submitted is answered first (a model swap)."""
        if drain and self._worker is not None and not self._worker.done():
            await self._queue.join()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the edge daemon is shutting down"))
        await asyncio.to_thread(self._executor.shutdown)  # waits for the worker thread, off the event loop

    async def submit(self, text: str) -> Result:
        """The text's result; raises Overloaded when `max_queue` requests already wait. A caller
        cancelled while waiting (its RPC cancelled) cancels the future: its text is skipped."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((text, time.perf_counter(), future))
        except asyncio.QueueFull:
            raise Overloaded(self._queue.qsize(), self._queue.maxsize) from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            started = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self._executor, self._predict, [t for t, _, _ in batch])
                inference_s = time.perf_counter() - started
                results = [Result(probs[row], started - queued, inference_s, len(batch)) for row, (_, queued, _) in enumerate(batch)]
            except asyncio.CancelledError:
                for _, _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # delivered to every waiting caller, not swallowed
                results = [exc] * len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                self._queue.task_done()
                if future.done():  # the caller gave up (deadline, cancellation)
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _next_batch(self) -> list[tuple[str, float, asyncio.Future[Result]]]:
        """Up to `max_batch` queued requests whose callers still wait; waits for the first."""
        batch: list[tuple[str, float, asyncio.Future[Result]]] = []
        while not batch:
            taken = [await self._queue.get()]
            while len(taken) < self._max_batch and not self._queue.empty():
                taken.append(self._queue.get_nowait())
            for entry in taken:
                if entry[2].done():  # cancelled: nobody waits for its answer, so the model skips it
                    self._queue.task_done()
                else:
                    batch.append(entry)
        return batch
