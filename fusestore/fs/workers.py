"""Worker threads for the blocking calls of request handlers (fsync, copies, validation).

`trio.to_thread.run_sync` costs about 200 us per call on the development machine (limiter,
context copy, thread naming, cache hand-off); a commit needs one per close(). These threads wait
on one queue and hand the result back with `run_sync_soon`, about 80 us per call. A call cannot
be cancelled once queued, as a commit must not be abandoned halfway.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, TypeVar

import outcome
import trio

T = TypeVar("T")


class Workers:
    def __init__(self, count: int = 16):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._work, name=f"fusestore-worker-{i}", daemon=True).start()

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run `fn(*args)` in a worker thread; return its result or raise its exception."""
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                pass  # the daemon is stopping; nobody waits for the answer

        self._queue.put((fn, args, deliver))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _work(self) -> None:
        while True:
            fn, args, deliver = self._queue.get()
            deliver(outcome.capture(fn, *args))
            del fn, args, deliver
