"""The ASGI edge of the served app: every request body is read here under a size limit and a deadline,
and the v2 infer POST, the hot route, is answered here too, with no router, middleware stack or
thread hop. This is the path under any ASGI server (uvicorn's own protocol, Ray Serve, a test
client); `serve`'s own protocol (http11) enforces the same limits and answers the hot route itself.

Below `server` (which builds the app) and beside `oip` (whose V2Infer answers the hot route).
"""
from __future__ import annotations

import asyncio
import logging
import time

from lstm_export.common.errors import describe

from .bodies import v1_error, v2_error


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class Front:
    """The app server.create_app returns: a POST to the v2 infer route goes to `infer.answer` behind
    the body limits; every other request goes to `app` (FastAPI), whose routes sit behind the same
    limits. It also carries what http11's protocol needs: model_of, answer_soon and the limits."""

    def __init__(self, app, infer, limits: dict):
        self.app, self.model_of, self.answer_soon, self.limits = app, infer.model_of, infer.answer_soon, limits
        self.infer = BodyLimits(infer, answer=infer.answer, **limits)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self.model_of(scope["path"]) is not None:
            return await self.infer(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimits:
    """ASGI middleware: reads each request body under a size limit and a deadline, then replays it to
    `app`, or, given `answer` (an async function of the scope and the whole body that returns the
    status, the headers and the body of the response), answers with it directly.

    An oversized body gets 413, a body that does not arrive in time 408, and a client that hangs
    up mid-body is dropped quietly; the metrics callback sees every answered request.
    """

    def __init__(self, app, max_bytes: int, timeout_s: float, record, answer=None):
        self.app, self.max_bytes, self.timeout_s, self.record, self.answer = app, max_bytes, timeout_s, record, answer
        self.deadlines = Deadlines(timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status = [500, False]  # the status sent, and whether a response has started

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            await send(message)

        try:
            body = await self._read(scope, receive)
        except _BodyTooLarge:
            await self._fail(path, 413, "body_too_large", f"request body over {self.max_bytes} bytes",
                             scope, receive, send_wrapper)
        except asyncio.TimeoutError:
            await self._fail(path, 408, "body_timeout", f"request body not received within {self.timeout_s} s",
                             scope, receive, send_wrapper)
        except _Disconnected:
            return  # the client is gone; nobody to answer
        else:
            try:
                if self.answer is not None:
                    code, headers, content = await self.answer(scope, body)
                    await send_wrapper({"type": "http.response.start", "status": code, "headers": headers})
                    await send({"type": "http.response.body", "body": content})
                else:
                    replay = [{"type": "http.request", "body": body, "more_body": False}]

                    async def replay_receive():
                        return replay.pop() if replay else await receive()

                    await self.app(scope, replay_receive, send_wrapper)
            except Exception as e:  # a bug, not bad input: logged, answered as JSON, counted
                logging.getLogger("lstm_export.serve").exception("unexpected error on %s", path)
                if status[1]:
                    raise
                why = describe(e, 200)
                await self._fail(path, 500, "internal_error", why, scope, receive, send_wrapper)
        self.record(route_label(path), status[0], time.perf_counter() - t0)

    async def _read(self, scope, receive) -> bytes:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            raise _BodyTooLarge
        return await self.deadlines.within(self._parts(receive))

    async def _parts(self, receive) -> bytes:
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_bytes:
                raise _BodyTooLarge
            parts.append(part)
            if not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)

    @staticmethod
    async def _fail(path: str, status: int, code: str, message: str, scope, receive, send) -> None:
        response = v2_error(status, message) if path.startswith("/v2") else v1_error(status, code, message)
        await response(scope, receive, send)  # each protocol's error body (v2 errors carry no code)


class Deadlines:
    """Deadlines for body reads, one timer for all of them: a read registers its task and the time it
    must end by, and a sweep every quarter of the limit cancels the reads past theirs (so a deadline
    holds to within 1.25x). A timer per request (asyncio.timeout) costs ~6 us of a ~100 us request."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._reading: dict[asyncio.Task, float] = {}
        self._expired: set[asyncio.Task] = set()
        self._timer, self._loop = None, None

    async def within(self, coro):
        """`await coro`, or asyncio.TimeoutError once the deadline has passed."""
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        self._reading[task] = loop.time() + self.seconds
        if self._timer is None or self._loop is not loop:  # (a test client may bring a new loop)
            self._timer, self._loop = loop.call_later(self.seconds / 4, self._sweep, loop), loop
        try:
            return await coro
        except asyncio.CancelledError:
            if task not in self._expired:
                raise  # cancelled by someone else: not ours to turn into a 408
            self._expired.discard(task)
            if hasattr(task, "uncancel"):  # 3.11+: the cancellation was ours, and is spent
                task.uncancel()
            raise asyncio.TimeoutError from None
        finally:
            self._reading.pop(task, None)

    def _sweep(self, loop) -> None:
        now = loop.time()
        for task, deadline in list(self._reading.items()):
            if deadline <= now:
                del self._reading[task]
                self._expired.add(task)
                task.cancel()
        self._timer = loop.call_later(self.seconds / 4, self._sweep, loop) if self._reading else None


ROUTES = {"/healthz", "/metrics", "/v1/model", "/v1/streams", "/v1/generate", "/v2", "/v2/health/live",
          "/v2/health/ready"}


def route_label(path: str) -> str:
    """A metrics label per route template, any unknown path as one label: the label set stays bounded."""
    if path.startswith("/v1/streams/"):
        return "/v1/streams/{id}"
    if path.startswith("/v2/models/"):
        tail = path.rsplit("/", 1)[-1]
        return f"/v2/models/{{name}}/{tail}" if tail in ("infer", "ready") else "/v2/models/{name}"
    return path if path in ROUTES else "other"
