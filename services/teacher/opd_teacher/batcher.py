"""Dynamic batching: score requests queue here and leave as big forwards, one at a time.

Both faces (HTTP, gRPC) submit to the same queue. A batch is formed when the forward worker is free: the
oldest waiting job decides the batch key (jobs with another top_k or temperature wait for a later batch),
compatible jobs join in arrival order while their tokens fit `max_batch_tokens`, and a batch that is not
full waits at most `max_wait_ms` for more. Jobs that were cancelled (client gone) or whose deadline passed
are dropped before compute. The queue holds at most `max_queue_tokens`; beyond that submit() refuses at
once with Overloaded (HTTP 429 / RESOURCE_EXHAUSTED) and a Retry-After estimated from measured throughput.

This module knows nothing about models: `run_batch(key, items)` does the work and returns one result per
item, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from opd_client.errors import DeadlineExceeded, Overloaded, Unavailable
from opd_teacher import metrics

log = logging.getLogger(__name__)

RunBatch = Callable[[Hashable, list[Any]], Sequence[Any]]


@dataclass(frozen=True)
class BatchLimits:
    """The batching and admission settings of `opd serve-teacher` (its flags are generated from these fields,
    each comment is the flag's --help).

    `max_batch_tokens` is the one budget of the service: the batcher groups requests by it, and the HF backend
    packs each forward's padded tokens by it (HFBackend takes these limits as `batch`).
    """

    # tokens per batched forward (teacher view: context + completion): queued requests join a batch while it
    # fits, one larger request runs alone; also the padded-token bound of one forward
    max_batch_tokens: int = 8192
    # milliseconds a partial batch waits for more requests when the forward worker is idle
    max_wait_ms: float = 5.0
    # tokens waiting in the queue beyond which requests get 429 / RESOURCE_EXHAUSTED + Retry-After
    max_queue_tokens: int = 65536
    # tokens one sample of /v1/completions or /v1/chat/completions may generate (max_tokens above it: 400);
    # also the chat default when max_tokens is not given. Bounds how long one request holds generation
    max_generation_tokens: int = 2048


@dataclass(eq=False)
class _Job:
    key: Hashable
    items: list[Any]
    tokens: int
    deadline: float | None  # time.monotonic() value
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """One queue and one dispatch loop per model; `executor` runs the forwards (shared across models)."""

    def __init__(
        self, name: str, run_batch: RunBatch, executor: Executor, limits: BatchLimits = BatchLimits()
    ):
        self.name = name
        self.limits = limits
        self._run_batch = run_batch
        self._executor = executor
        self._queue: deque[_Job] = deque()
        self._queued_tokens = 0
        self._running_tokens = 0
        self._arrived = asyncio.Event()
        self._tokens_per_s: float | None = None  # moving average over recent forwards
        self._loop_task: asyncio.Task | None = None

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_jobs(self) -> int:
        return len(self._queue)

    async def submit(
        self, key: Hashable, items: list[Any], tokens: int, deadline: float | None = None
    ) -> list[Any]:
        """The results for `items`, once a batch holding them has run. Cancelling the caller drops the job."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        if self._queued_tokens and self._queued_tokens + tokens > self.limits.max_queue_tokens:
            metrics.REJECTED.labels(self.name, "queue_full").inc()
            raise Overloaded(
                f"the teacher's queue is full ({self._queued_tokens} tokens waiting, limit "
                f"max_queue_tokens = {self.limits.max_queue_tokens}); retry later",
                retry_after=self._retry_after(),
            )
        self._ensure_loop()
        job = _Job(key=key, items=items, tokens=tokens, deadline=deadline)
        self._push(job)
        try:
            if deadline is None:
                return await job.future
            return await asyncio.wait_for(job.future, timeout=deadline - time.monotonic())
        except TimeoutError:
            if self._discard(job):
                metrics.REJECTED.labels(self.name, "deadline").inc()
                raise DeadlineExceeded(
                    f"the request's deadline passed after {time.monotonic() - job.enqueued:.2f} s in the "
                    "queue, before its forward started"
                ) from None
            raise DeadlineExceeded("the request's deadline passed while its forward ran") from None
        except asyncio.CancelledError:  # the caller is gone (client disconnected or cancelled the call)
            if self._discard(job):
                metrics.REJECTED.labels(self.name, "cancelled").inc()
            raise

    def _retry_after(self) -> float:
        """Seconds until the work ahead is likely done: waiting + running tokens at measured speed."""
        if not self._tokens_per_s:
            return 1.0
        return min(60.0, max(1.0, (self._queued_tokens + self._running_tokens) / self._tokens_per_s))

    # ---- queue bookkeeping ------------------------------------------------------------------------------

    def _push(self, job: _Job) -> None:
        self._queue.append(job)
        self._queued_tokens += job.tokens
        self._arrived.set()
        self._publish_depth()

    def _discard(self, job: _Job) -> bool:
        """Take a job out of the queue if it is still waiting; False once its batch has taken it."""
        if job not in self._queue:
            return False
        self._remove(job)
        return True

    def _remove(self, job: _Job) -> None:
        self._queue.remove(job)
        self._queued_tokens -= job.tokens
        self._publish_depth()

    def _publish_depth(self) -> None:
        metrics.QUEUE_REQUESTS.labels(self.name).set(len(self._queue))
        metrics.QUEUE_TOKENS.labels(self.name).set(self._queued_tokens)

    # ---- the dispatch loop ------------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def _dispatch_forever(self) -> None:
        while True:
            self._drop_dead_jobs()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._wait_for_company()
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    def _drop_dead_jobs(self) -> None:
        """Backstop for submit()'s own handling: nothing cancelled or expired may reach a forward."""
        now = time.monotonic()
        for job in list(self._queue):
            if job.future.done():
                self._remove(job)
            elif job.deadline is not None and now >= job.deadline:
                self._remove(job)
                metrics.REJECTED.labels(self.name, "deadline").inc()
                job.future.set_exception(
                    DeadlineExceeded("the request's deadline passed in the queue, before its forward started")
                )

    async def _wait_for_company(self) -> None:
        """A partial batch waits up to max_wait_ms after its oldest job arrived, unless the budget fills."""
        while True:
            oldest = self._queue[0] if self._queue else None
            if oldest is None:
                return
            remaining = oldest.enqueued + self.limits.max_wait_ms / 1000 - time.monotonic()
            if remaining <= 0 or self._compatible_tokens(oldest.key) >= self.limits.max_batch_tokens:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _compatible_tokens(self, key: Hashable) -> int:
        return sum(job.tokens for job in self._queue if job.key == key)

    def _take_batch(self) -> list[_Job]:
        self._drop_dead_jobs()
        if not self._queue:
            return []
        key, budget = self._queue[0].key, self.limits.max_batch_tokens
        batch: list[_Job] = []
        tokens = 0
        for job in list(self._queue):
            if job.key != key:
                continue
            if batch and tokens + job.tokens > budget:
                break  # keep arrival order: a later small job does not overtake an earlier big one
            batch.append(job)
            tokens += job.tokens
        for job in batch:
            self._remove(job)
        return batch

    async def _run(self, batch: list[_Job]) -> None:
        started = time.monotonic()
        for job in batch:
            metrics.QUEUE_SECONDS.labels(self.name).observe(started - job.enqueued)
        items = [item for job in batch for item in job.items]
        tokens = sum(job.tokens for job in batch)
        self._running_tokens = tokens
        metrics.BATCH_TOKENS.labels(self.name).set(tokens)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, batch[0].key, items)
        except Exception as e:  # noqa: BLE001 - every job of the batch gets the error; the loop goes on
            log.exception("forward of %d jobs (%d tokens) failed", len(batch), tokens)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self._running_tokens = 0
            metrics.BATCH_TOKENS.labels(self.name).set(0)
        elapsed = time.monotonic() - started
        metrics.FORWARD_SECONDS.labels(self.name).observe(elapsed)
        metrics.BATCH_JOBS.labels(self.name).observe(len(batch))
        self._note_speed(tokens, elapsed)
        start = 0
        for job in batch:
            part = list(results[start : start + len(job.items)])
            start += len(job.items)
            if not job.future.done():  # the caller may have gone while the forward ran
                job.future.set_result(part)

    def _note_speed(self, tokens: int, elapsed: float) -> None:
        if elapsed <= 0:
            return
        speed = tokens / elapsed
        self._tokens_per_s = speed if self._tokens_per_s is None else 0.7 * self._tokens_per_s + 0.3 * speed

    async def close(self) -> None:
        """Stop dispatching; jobs still waiting get Unavailable (the service is going away)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for job in list(self._queue):
            self._remove(job)
            if not job.future.done():
                job.future.set_exception(Unavailable("the teacher is shutting down; retry", retry_after=1))
