"""Dynamic batching across clients: images wait up to ``max_wait_s`` for others, up to ``max_batch`` a batch.

A request's images join one bounded queue (:class:`Batcher`); a single worker takes the first waiting image,
gathers more for at most ``max_wait_s`` (or until ``max_batch``), and runs the model once on the batch in one
worker thread (the model is used by one thread at a time; the event loop stays free to accept, parse and
refuse requests meanwhile). When the images waiting and running would exceed ``max_queue``, a new request is
refused at once with :class:`QueueFull` (a server answers 503 and ``Retry-After``) rather than left to time
out; a request that waits longer than its timeout gets :class:`asyncio.TimeoutError` and its images, if not
yet started, are dropped from the queue.

>>> import asyncio
>>> async def demo():
...     batcher = Batcher(lambda items: [x * 10 for x in items], max_batch=4, max_wait_s=0.01, max_queue=8)
...     batcher.start()
...     answers = await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]))
...     await batcher.stop()
...     return answers, batcher.batches
>>> asyncio.run(demo())
([[10, 20], [30]], 1)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transferkit.errors import QueueFull

__all__ = ["Batcher", "QueueFull"]


@dataclass
class _Item:
    value: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers items from concurrent requests into batches for ``run`` (``list -> list``, same order)."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        max_batch: int = 16,
        max_wait_s: float = 0.01,
        max_queue: int = 64,
    ) -> None:
        if max_batch < 1 or max_queue < max_batch or max_wait_s < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= max_batch and max_wait_s >= 0; got {max_batch}, "
                f"{max_queue}, {max_wait_s}."
            )
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.pending = 0  # images queued or in the batch that runs
        self.batches = 0
        self.batch_sizes: list[int] = []
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True)

    async def submit(self, values: Sequence[Any], timeout: float | None = None) -> list[Any]:
        """The answers for ``values``, in order, once their batches ran. Raises :class:`QueueFull` at once
        when the queue cannot take them, ``asyncio.TimeoutError`` after ``timeout`` seconds."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self.pending + len(values) > self.max_queue:
            raise QueueFull(
                f"the queue is full ({self.pending} images waiting or running, at most {self.max_queue}); "
                "retry in a moment"
            )
        loop = asyncio.get_running_loop()
        items = [_Item(v, loop.create_future()) for v in values]
        self.pending += len(items)
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), timeout))
        finally:
            for item in items:  # a timed-out request's images not started yet are skipped by the worker
                if not item.future.done():
                    item.future.cancel()

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            live = [item for item in batch if not item.future.done()]
            self.pending -= len(batch) - len(live)
            if not live:
                continue
            try:
                answers = await loop.run_in_executor(self.executor, self.run, [i.value for i in live])
            except Exception as err:  # the model failed: every request of the batch gets the error
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(err)
            else:
                for item, answer in zip(live, answers, strict=True):
                    if not item.future.done():
                        item.future.set_result(answer)
            finally:
                self.pending -= len(live)
                self.batches += 1
                self.batch_sizes.append(len(live))
                del self.batch_sizes[:-1000]
