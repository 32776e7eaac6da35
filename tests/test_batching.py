"""The server's batcher alone: which requests share a batch, and that every answer is its own."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from nfnet_hub.serve.batching import Batcher


class Recorder:
    """A model that returns each row's index tag, and records the batches it was given."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.batches: list[int] = []
        self.delay_s, self.fail = delay_s, fail
        self.running, self.most_at_once, self.lock = 0, 0, threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            import time

            time.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("the model failed")
            self.batches.append(len(x))
            return x * 2
        finally:
            with self.lock:
                self.running -= 1


def _requests(sizes: list[int]) -> list[np.ndarray]:
    start, out = 0, []
    for n in sizes:
        out.append(np.arange(start, start + n, dtype=np.float32)[:, None])
        start += n
    return out


def _gather(batcher: Batcher, requests: list[np.ndarray], gap_s: float = 0.0):
    async def one(x, k):
        await asyncio.sleep(k * gap_s)
        return await batcher(x)

    async def run():
        try:
            return await asyncio.wait_for(  # a lost request fails the test, it does not hang it
                asyncio.gather(*(one(x, k) for k, x in enumerate(requests)), return_exceptions=True), 30)
        finally:
            batcher.close()
    return asyncio.run(run())


def test_requests_within_the_delay_share_a_batch_and_get_their_own_rows():
    model = Recorder()
    requests = _requests([1, 2, 3, 1])
    answers = _gather(Batcher(model, max_batch_size=32, max_delay_s=0.2), requests)
    assert model.batches == [7]
    for x, y in zip(requests, answers):
        np.testing.assert_array_equal(y, x * 2)


def test_a_full_batch_closes_and_a_request_that_does_not_fit_opens_the_next():
    model = Recorder()
    requests = _requests([3, 3, 3, 1])  # 3 + 3 fit in 7; the third 3 would not: it opens the next batch
    answers = _gather(Batcher(model, max_batch_size=7, max_delay_s=0.2), requests)
    assert model.batches == [6, 4]
    for x, y in zip(requests, answers):
        np.testing.assert_array_equal(y, x * 2)


def test_without_company_a_request_waits_only_the_delay():
    model = Recorder()
    answers = _gather(Batcher(model, max_batch_size=8, max_delay_s=0.01), _requests([1, 1]), gap_s=0.3)
    assert model.batches == [1, 1] and len(answers) == 2


def test_instances_run_batches_at_once_and_requests_wait_for_a_free_one():
    model = Recorder(delay_s=0.2)
    requests = _requests([1] * 6)
    answers = _gather(Batcher(model, max_batch_size=1, max_delay_s=0.0, instances=2), requests)
    assert model.most_at_once == 2 and model.batches == [1] * 6
    for x, y in zip(requests, answers):
        np.testing.assert_array_equal(y, x * 2)


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_goes_on():
    model = Recorder(fail=True)
    batcher = Batcher(model, max_batch_size=8, max_delay_s=0.05)

    async def run():
        first = await asyncio.gather(batcher(np.zeros((1, 1), np.float32)), batcher(np.zeros((2, 1), np.float32)),
                                     return_exceptions=True)
        model.fail = False
        second = await batcher(np.ones((1, 1), np.float32))
        batcher.close()
        return first, second
    first, second = asyncio.run(run())
    assert all(isinstance(e, RuntimeError) for e in first)
    np.testing.assert_array_equal(second, [[2.0]])


def test_a_request_above_the_limit_is_refused_and_bad_settings_too():
    batcher = Batcher(Recorder(), max_batch_size=4, max_delay_s=0.0)
    with pytest.raises(ValueError, match="above the server's --max-batch-size 4"):
        asyncio.run(batcher(np.zeros((5, 1), np.float32)))
    for bad in ({"max_batch_size": 0}, {"instances": 0}, {"max_delay_s": -1.0}):
        with pytest.raises(ValueError):
            Batcher(Recorder(), **{"max_batch_size": 4, "max_delay_s": 0.0, **bad})
