"""Dynamic batching in front of ONNX Runtime: requests that arrive close together run as one batch.

KServe's Python model server runs one ``predict`` per request; its batcher is a separate sidecar. This
is the small layer the server needs instead: the first waiting request opens a batch, which closes when
it holds ``max_batch_size`` rows or ``max_delay`` seconds after that request arrived, whichever comes
first. ``instances`` batches run at once (as Triton's ``instance_group`` count); while they are all busy,
requests wait and the next batch gathers them. A request is never split across batches.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Request:
    rows: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers concurrent ``await batcher(rows)`` calls into batches for ``run``.

    ``observe(queue_seconds, compute_seconds, batch_rows)`` is called once per batch (for metrics)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_delay_s: float,
                 instances: int = 1, observe: Callable[[list[float], float, int], None] | None = None):
        if max_batch_size < 1 or instances < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and instances must be positive, max_delay_s not negative")
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.instances, self.observe = instances, observe
        self._pool = ThreadPoolExecutor(instances, thread_name_prefix="nfnet-hub-batch")
        self._queue: asyncio.Queue[_Request] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) > self.max_batch_size:
            raise ValueError(f"a request of {len(rows)} rows is above the server's --max-batch-size "
                             f"{self.max_batch_size}")
        if self._task is None:  # started on first use, inside the server's event loop
            self._queue, self._slots = asyncio.Queue(), asyncio.Semaphore(self.instances)
            self._task = asyncio.create_task(self._gather())
        request = _Request(rows, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(request)
        return await request.future

    async def _gather(self) -> None:
        carried: _Request | None = None
        while True:
            first = carried or await self._queue.get()
            carried = None
            await self._slots.acquire()
            batch, rows = [first], len(first.rows)
            deadline = first.arrived + self.max_delay_s
            while rows < self.max_batch_size:
                try:
                    wait = deadline - time.perf_counter()
                    nxt = self._queue.get_nowait() if wait <= 0 or not self._queue.empty() \
                        else await asyncio.wait_for(self._queue.get(), wait)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                if rows + len(nxt.rows) > self.max_batch_size:
                    carried = nxt  # opens the next batch
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            asyncio.create_task(self._run(batch))

    async def _run(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([r.rows for r in batch])
            outputs = await asyncio.get_running_loop().run_in_executor(self._pool, self.run, inputs)
        except Exception as e:  # every request of the batch gets the error; the server keeps serving
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
            return
        finally:
            self._slots.release()
        if self.observe:
            self.observe([started - r.arrived for r in batch], time.perf_counter() - started, len(inputs))
        start = 0
        for r in batch:
            if not r.future.done():  # a client that went away has a cancelled future
                r.future.set_result(outputs[start:start + len(r.rows)])
            start += len(r.rows)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
