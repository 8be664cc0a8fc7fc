"""How a batch run hands each request its answer, from whichever thread ran it: a future of an event
loop settled from another thread (LoopFuture), or a callback in a future's place (Direct). Both look
like a future to the batch run (done, set_result, set_exception)."""
from __future__ import annotations

import asyncio
import logging


class LoopFuture:
    """An event loop's future that a batch run on another thread completes (set_result/set_exception
    from any thread; the loop resumes its waiter)."""

    __slots__ = ("future", "loop")

    def __init__(self, future: asyncio.Future, loop):
        self.future, self.loop = future, loop

    def done(self) -> bool:
        return False  # known only on the loop's thread: settle checks there

    def set_result(self, value) -> None:
        self.loop.call_soon_threadsafe(settle, self.future, value, None)

    def set_exception(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(settle, self.future, None, error)


class Direct:
    """A future that is a callback: done(value, None) or done(None, error), at once, on the thread
    that settles it (the loop's, for submit()). What the callback raises is logged, never let out
    into the batch run that calls it (the batch's other requests still get their answers)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def done(self) -> bool:
        return False

    def set_result(self, value) -> None:
        self._call(value, None)

    def set_exception(self, error: BaseException) -> None:
        self._call(None, error)

    def _call(self, value, error) -> None:
        try:
            self.fn(value, error)
        except Exception:
            logging.getLogger("lstm_export.serve").exception("answering a request failed")


def settle(future: asyncio.Future, value, error) -> None:
    if not future.done():  # the waiter may have gone (its client hung up and the task was cancelled)
        future.set_exception(error) if error is not None else future.set_result(value)
