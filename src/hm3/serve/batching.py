"""Dynamic batching: texts from concurrent requests are gathered into one forward pass.

A small asyncio micro-batcher rather than a library: the batching libraries on PyPI either belong to
a serving framework (Ray Serve's `@serve.batch`) or are thin, little-kept wrappers; what a
classifier server needs is ~60 lines: a queue of texts, one worker that takes up to `max_batch_size`
of them (in turn from each waiting request) (waiting at most `max_wait_ms` for more once the first
has arrived), runs the model in ONE worker thread so the event loop keeps accepting requests
meanwhile, and hands each text its own result. While the model runs, new texts queue; with the
default wait of 0 the next batch is what queued, taken as soon as the model is free: batches grow
with the load and a lone request never waits (benchmarks/RESULTS.md §6.5).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from hm3.errors import Hm3Error


class TextFailed(Exception):
    """The model or its tokenizer could not take text `index` of a request (`cause` says why)."""

    def __init__(self, index: int, cause: BaseException):
        super().__init__(f"texts.{index}: the model could not classify this text "
                         f"({type(cause).__name__}: {cause})")
        self.index, self.cause = index, cause


class _Failed:
    """A text's result slot when the text alone fails (see `run_isolated`)."""

    def __init__(self, cause: BaseException):
        self.cause = cause


def run_isolated(run: Callable[[list[str]], list], texts: list[str]) -> list:
    """`run(texts)`; should it raise, the texts are split in halves and run again, down to single
    texts, so that one text the model cannot take fails alone (its slot holds a `_Failed`) and
    its batch-mates still get their results: about 2·log2(n) extra runs per bad text."""
    try:
        return list(run(texts))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises belongs to one text
        if len(texts) == 1:
            return [_Failed(exc)]
    half = len(texts) // 2
    return run_isolated(run, texts[:half]) + run_isolated(run, texts[half:])


async def gather_texts(futures: Sequence) -> list:
    """Await one future per text of a request: their results in order, or `TextFailed` naming
    the first text that failed."""
    results = await asyncio.gather(*futures)
    for index, result in enumerate(results):
        if isinstance(result, _Failed):
            raise TextFailed(index, result.cause)
    return list(results)


def check_batching(max_batch_size: int, max_wait_ms: float) -> None:
    """Refuse batching settings that cannot work (any batcher's)."""
    if max_batch_size < 1:
        raise Hm3Error(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_wait_ms < 0:
        raise Hm3Error(f"max_wait_ms must be 0 or more, got {max_wait_ms}")


class MicroBatcher:
    """Batch texts from many callers; `await submit(texts)` returns their results in order.

    A batch takes the waiting requests' texts in turn, one text from each request at a time, so
    a request of a few texts is not queued behind every text of a large one.

    - `run`: classifies a list of texts, returning one result per text (called in a worker
    thread).
    - `max_batch_size`: most texts in one call of `run`.
    - `max_wait_ms`: how long the first text of a batch waits for others to join it (0: no wait;
    the batch is whatever queued while the previous batch ran).
    - `on_batch`: called with (batch size, seconds) after every batch, e.g. to record metrics.
    """

    def __init__(self, run: Callable[[list[str]], list], max_batch_size: int = 32,
                 max_wait_ms: float = 0.0,
                 on_batch: Callable[[int, float], None] | None = None):
        check_batching(max_batch_size, max_wait_ms)
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._waiting: deque[deque] = deque()  # per request, its (text, future) not yet taken
        self._count = 0  # texts in `_waiting`
        self._arrived: asyncio.Event | None = None
        self._stopping = False
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm3-model")
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Finish every text already queued, then stop the worker."""
        if self._worker is None:
            return
        self._stopping = True
        self._arrived.set()
        await self._worker
        self._executor.shutdown(wait=True)
        self._worker = None

    async def submit(self, texts: Sequence[str]) -> list:
        """The results of `texts`, in order; `TextFailed` if the model cannot take one of them.
        Cancelling the call drops its texts that are still queued."""
        if self._worker is None or self._worker.done() or self._stopping:
            raise Hm3Error("the batcher is not running")
        loop = asyncio.get_running_loop()
        items = deque((text, loop.create_future()) for text in texts)
        futures = [future for _, future in items]
        if items:
            self._waiting.append(items)
            self._count += len(items)
            self._arrived.set()
        return await gather_texts(futures)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting and not self._stopping:
                self._arrived.clear()
                await self._arrived.wait()
            if not self._waiting:
                break  # stopping, and nothing is left
            deadline = loop.time() + self.max_wait
            while self._count < self.max_batch_size and not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if batch:
                await self._run_batch(loop, batch)

    def _take(self) -> list:
        """Up to `max_batch_size` texts, one from each waiting request in turn; texts whose
        caller went away (cancelled future) are dropped, not classified."""
        batch = []
        while self._waiting and len(batch) < self.max_batch_size:
            request = self._waiting.popleft()
            text, future = request.popleft()
            self._count -= 1
            if not future.done():
                batch.append((text, future))
            if request:
                self._waiting.append(request)
        return batch

    async def _run_batch(self, loop, batch: list) -> None:
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, run_isolated, self.run,
                                                 [text for text, _ in batch])
        except Exception as exc:  # noqa: BLE001 - the callers get the error, the worker goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)
