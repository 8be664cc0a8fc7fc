"""`serve`'s HTTP/1.1: a connection protocol for uvicorn's server that answers the v2 infer POST itself
and hands every other request, whole, to the ASGI app.

uvicorn's own protocol spends ~0.06 ms of CPU a request on this 2-core VM (an ASGI scope and message
dicts, an asyncio.Event, header checks by regex, two writes, a keep-alive timer re-armed per request):
a fifth of what a served request costs in all (docs/serving.md, "Where the time goes"). Here a request
is parsed by httptools into a small record; the hot route goes straight to oip.V2Infer.answer, and
its response leaves as one write. uvicorn still runs the server around it: sockets, signals,
lifespan, the Date header, graceful shutdown (it calls shutdown() on every connection and waits for
the tasks in server_state.tasks).

HTTP/1.1 as a client may use it: keep-alive (closed after `keep_alive_s` idle), pipelined requests
answered in order (reading pauses while 8 wait), HTTP/1.0 and `Connection: close`, `Expect:
100-continue`, chunked request bodies. The limits hold before any parsing, for every route: a body
over `max_body_bytes` (declared or received) is a 413 and the connection closes, a request not
received within `body_timeout_s` is a 408 and the connection closes, a malformed one a 400.
"""
from __future__ import annotations

import asyncio
import http
import logging
import time
import urllib.parse
from collections import deque

import httptools

from .bodies import error_body, json_answer, v1_error_body
from .front import route_label

LOG = logging.getLogger("lstm_export.serve")
MAX_PIPELINED = 8  # requests a connection may have waiting for answers before reading pauses
_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}


class _Request:
    __slots__ = ("method", "url", "headers", "parts", "size", "keep_alive", "version", "t0", "response",
                 "expect_continue")

    def __init__(self, t0: float):
        self.url, self.headers, self.parts, self.size, self.t0 = b"", [], [], 0, t0
        self.response, self.expect_continue = None, False


def protocol_for(front) -> type:
    """The protocol class for uvicorn.Config(http=...) serving `front` (server.create_app's app): its
    infer route answered by front.answer_soon, the rest by front itself, under front.limits."""
    return type("ServeProtocol", (ServeProtocol,), {"model_of": staticmethod(front.model_of),
                                                    "answer_soon": staticmethod(front.answer_soon),
                                                    "limits": front.limits})


class ServeProtocol(asyncio.Protocol):
    model_of = answer_soon = limits = None  # set by protocol_for

    def __init__(self, config, server_state, app_state=None, _loop=None):
        if not config.loaded:
            config.load()
        self.app, self.state, self.app_state = config.loaded_app, server_state, app_state or {}
        self.loop = _loop or asyncio.get_event_loop()
        self.keep_alive_s = config.timeout_keep_alive
        self.max_bytes, self.timeout_s, self.record = (self.limits[k] for k in ("max_bytes", "timeout_s", "record"))
        self.parser = httptools.HttpRequestParser(self)
        self.transport = self.req = self.deadline = self.idle = None
        self.queue: deque[_Request] = deque()  # requests answered in this order
        self.closing = self.stopped = self.paused = False  # shutting down; no more requests read; reading paused
        self.last_active = 0.0

    # --- the connection ----------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.state.connections.add(self)
        peer, here = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        self.client = tuple(peer[:2]) if isinstance(peer, tuple) else None
        self.server = tuple(here[:2]) if isinstance(here, tuple) else None
        self.last_active = self.loop.time()
        self.idle = self.loop.call_later(self.keep_alive_s, self._idle_check)

    def connection_lost(self, exc) -> None:
        self.state.connections.discard(self)
        for timer in (self.deadline, self.idle):
            if timer is not None:
                timer.cancel()
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrade_unsupported", "this server does not upgrade connections (no WebSocket)")
            return
        except httptools.HttpParserError:
            self._refuse(400, "malformed_request", "malformed HTTP request")
            return
        if self.req is not None and self.deadline is None and not self.stopped:
            # a request still arriving after what came: it has timeout_s from now to finish
            self.deadline = self.loop.call_later(self.timeout_s, self._late)

    def shutdown(self) -> None:
        """uvicorn's graceful stop: close now if idle, else after the answers in progress."""
        self.closing = True
        if not self.queue:
            self.transport.close()

    def pause_writing(self) -> None:  # responses are small and whole: the transport buffers them
        pass

    def resume_writing(self) -> None:
        pass

    def _idle_check(self) -> None:
        """One timer a connection, not one a request: closes it after keep_alive_s without data."""
        if self.transport.is_closing():
            return
        left = self.last_active + self.keep_alive_s - self.loop.time()
        if left <= 0 and not self.queue and self.req is None:
            self.transport.close()
        else:
            self.idle = self.loop.call_later(max(left, 0.1), self._idle_check)

    # --- the parser's callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.req = None if self.stopped else _Request(time.perf_counter())

    def on_url(self, url: bytes) -> None:
        if self.req is not None:
            self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.req is None:
            return
        name, value = name.lower(), value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.req.expect_continue = True
        self.req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        r, p = self.req, self.parser
        if r is None:
            return
        r.method, r.version, r.keep_alive = p.get_method().decode("ascii"), p.get_http_version(), p.should_keep_alive()
        declared = next((v for k, v in r.headers if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            self._refuse(413, "body_too_large", f"request body over {self.max_bytes} bytes")
        elif r.expect_continue and not self.queue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        r = self.req
        if r is None:  # refused
            return
        r.size += len(body)
        if r.size > self.max_bytes:
            self._refuse(413, "body_too_large", f"request body over {self.max_bytes} bytes")
            return
        r.parts.append(body)

    def on_message_complete(self) -> None:
        r, self.req = self.req, None
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if r is None or self.transport.is_closing():
            return
        self.queue.append(r)
        if len(self.queue) >= MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        parsed = httptools.parse_url(r.url)
        path = parsed.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        body = r.parts[0] if len(r.parts) == 1 else b"".join(r.parts)
        if r.method == "POST" and self.model_of(path) is not None:
            # checked and queued for this loop turn's batch now; answered from the batch's run, with
            # no task or future between (oip.V2Infer.answer_soon)
            try:
                self.answer_soon(path, r.headers, body, lambda *answer: self._hot_reply(r, path, *answer))
            except Exception as e:  # a bug, not bad input: logged, answered as JSON, counted
                LOG.exception("unexpected error on %s", path)
                self._hot_reply(r, path, *json_answer(500, error_body(f"{type(e).__name__}: {str(e)[:200]}")))
            return
        task = self.loop.create_task(self._asgi(r, path, parsed, body))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    # --- answering -------------------------------------------------------------------------------
    def _hot_reply(self, r: _Request, path: str, code: int, headers: list, content: bytes) -> None:
        self.record(route_label(path), code, time.perf_counter() - r.t0)
        self._respond(r, code, headers, content)

    async def _asgi(self, r: _Request, path: str, parsed, body: bytes) -> None:
        """Any other route: the ASGI app gets the whole body and its answer is sent in one write."""
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": r.version,
                 "server": self.server, "client": self.client, "scheme": "http", "method": r.method,
                 "root_path": "", "path": path, "raw_path": parsed.path, "query_string": parsed.query or b"",
                 "headers": r.headers, "state": self.app_state.copy()}
        start, parts, gone = {}, [], self.loop.create_future()
        given = [False]

        async def receive():
            if not given[0]:
                given[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone  # the answer is sent or the client left: nothing more will come
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                parts.append(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        except Exception:
            LOG.exception("unexpected error on %s", path)
            if not start:
                start.update(status=500, headers=[(b"content-type", b"text/plain; charset=utf-8")])
                parts[:] = [b"Internal Server Error"]
        finally:
            if not gone.done():
                gone.set_result(None)
        if not start:
            start.update(status=500, headers=[(b"content-type", b"text/plain; charset=utf-8")])
            parts[:] = [b"Internal Server Error"]
        content = b"".join(parts)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length",
                                                                                     b"transfer-encoding")]
        headers.append((b"content-length", str(len(content)).encode()))
        self._respond(r, start["status"], headers, b"" if r.method == "HEAD" else content)

    def _respond(self, r: _Request, code: int, headers: list, content: bytes) -> None:
        """Sends r's answer once every request before it on this connection has had its own."""
        close = not r.keep_alive or self.closing
        head = [_STATUS.get(code) or f"HTTP/1.1 {code} \r\n".encode()]
        for name, value in (*self.state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        if close:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", content)
        r.response, r.keep_alive = b"".join(head), not close
        while self.queue and self.queue[0].response is not None:
            done = self.queue.popleft()
            self.state.total_requests += 1
            if self.transport.is_closing():
                continue
            self.transport.write(done.response)
            if not done.keep_alive or self.closing and not self.queue:
                self.transport.close()
        if self.paused and len(self.queue) < MAX_PIPELINED and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def _refuse(self, code: int, kind: str, message: str) -> None:
        """Answers the request being read (after any answers it waits behind) and closes: what is left
        of its body is never read."""
        r = self.req or _Request(time.perf_counter())
        self.req, self.stopped = None, True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        path = httptools.parse_url(r.url).path.decode("ascii", "replace") if r.url else ""
        self.record(route_label(path), code, time.perf_counter() - r.t0)
        body = error_body(message) if path.startswith("/v2") else v1_error_body(kind, message)
        r.keep_alive = False
        self.queue.append(r)
        self.transport.pause_reading()
        self._respond(r, *json_answer(code, body))

    def _late(self) -> None:
        self.deadline = None
        if self.req is not None:
            self._refuse(408, "body_timeout", f"request body not received within {self.timeout_s} s")


def run(front, host: str, port: int) -> None:
    """Serves `front` (server.create_app's app) on host:port with uvicorn's server and this protocol."""
    import uvicorn
    uvicorn.run(front, host=host, port=port, log_level="warning", access_log=False, proxy_headers=False,
                http=protocol_for(front))
