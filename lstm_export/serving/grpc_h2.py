"""gRPC's transport for `serve --grpc-port`: HTTP/2 (the h2 library) answered on the HTTP server's
event loop, as http11.py answers HTTP/1.1, carrying grpc_oip.Service's messages.

Why not grpcio's server: with no model behind it (a canned answer, perf_analyzer at 1 client on the
2-core Zen 4 VM), grpcio's asyncio server took 256 us a streamed request and 482 us a unary one, its
thread-pool server 246 and 442, more than the whole of `serve`'s HTTP round trip with the model
(491 us); this protocol took 140 and 301 (the same test). grpcio stays for the clients.

What it speaks (the gRPC over HTTP/2 spec): POST /inference.GRPCInferenceService/METHOD with
`content-type: application/grpc`; messages framed as a compressed flag (0: compression is refused)
and a 4-byte big-endian length; responses as HEADERS (:status 200), DATA, and trailers with
`grpc-status` and a percent-encoded `grpc-message`; a failure before any message is a
trailers-only response. ModelInfer and ModelStreamInfer's messages take HTTP's hot path
(grpc_oip.Service.infer_soon): checked in data_received, queued for this loop turn's batch, answered
from the run, with no task or future; a stream's messages go into the batch one at a time, in order,
and its trailers follow the client's end of the stream once all are answered. The other methods
are coroutines. Flow control: data beyond a stream's send window waits for the peer's
WINDOW_UPDATE. A connection that drops cancels its calls and nothing else.
"""
from __future__ import annotations

import asyncio
import collections
import struct
from urllib.parse import quote

from lstm_export.common.errors import describe

from .grpc_oip import INTERNAL, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, GrpcError, Service

PREFIX = "/inference.GRPCInferenceService/"
MAX_MESSAGE = 64 << 20
HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # grpc-message: percent-encode the rest


def _trailers(code: int, message: str = "") -> list:
    return [("grpc-status", str(code))] + ([("grpc-message", quote(message, safe=_SAFE))] if message else [])


class _Call:
    __slots__ = ("method", "buf", "started", "queue", "busy", "ended", "task", "pending", "trailers")

    def __init__(self, method: str):
        self.method, self.buf, self.started = method, b"", False
        self.task = self.trailers = None  # task: a unary call's coroutine (the metadata methods)
        self.queue = collections.deque()  # ModelStreamInfer's messages not yet answered, in order
        self.busy = self.ended = False  # a message in the batch; the client's end of the stream
        self.pending = []  # data waiting for the send window; the trailers go after it


class GrpcProtocol(asyncio.Protocol):
    """One HTTP/2 connection carrying gRPC calls to `service`."""

    def __init__(self, service: Service):
        self.service = service
        self.calls: dict[int, _Call] = {}

    def connection_made(self, transport) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        self.transport, self.loop = transport, asyncio.get_running_loop()
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self._flush()

    def connection_lost(self, exc) -> None:
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()

    def data_received(self, data: bytes) -> None:
        from h2 import events
        from h2.exceptions import ProtocolError
        try:
            received = self.conn.receive_data(data)
        except ProtocolError:
            self._flush()
            self.transport.close()
            return
        for ev in received:
            if isinstance(ev, events.RequestReceived):
                self._request(ev.stream_id, dict(ev.headers))
            elif isinstance(ev, events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                self._data(ev.stream_id, ev.data)
            elif isinstance(ev, events.StreamEnded):
                self._ended(ev.stream_id)
            elif isinstance(ev, events.StreamReset):
                call = self.calls.pop(ev.stream_id, None)
                if call is not None and call.task is not None:
                    call.task.cancel()
            elif isinstance(ev, events.WindowUpdated):
                self._resume(ev.stream_id)
            elif isinstance(ev, events.ConnectionTerminated):
                self.transport.close()
        self._flush()

    def _request(self, sid: int, headers: dict) -> None:
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not path.startswith(PREFIX):
            self._finish(sid, UNIMPLEMENTED, f"{path!r} is not a method of inference.GRPCInferenceService")
            return
        self.calls[sid] = _Call(path[len(PREFIX):])

    def _data(self, sid: int, data: bytes) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.buf += data
        while len(call.buf) >= 5:
            flag, n = call.buf[0], struct.unpack_from(">I", call.buf, 1)[0]
            if flag != 0 or n > MAX_MESSAGE:
                self._fail(sid, call, UNIMPLEMENTED if flag else RESOURCE_EXHAUSTED,
                           "compressed messages are not accepted: send them uncompressed" if flag else
                           f"a message of {n} bytes is over the {MAX_MESSAGE}-byte limit")
                return
            if len(call.buf) < 5 + n:
                break
            message, call.buf = call.buf[5:5 + n], call.buf[5 + n:]
            if call.method == Service.STREAM:
                call.queue.append(message)
                self._next(sid, call)
            elif call.task is None and not call.busy:
                if call.method == "ModelInfer":  # the hot path: no coroutine (Service.infer_soon)
                    call.busy = True
                    self.service.infer_soon(message, lambda answer, error: self._answered(sid, call, answer, error))
                else:
                    call.task = self.loop.create_task(self._unary(sid, call, message))
            else:
                self._fail(sid, call, INVALID_ARGUMENT, f"{call.method} takes one request message")
                return

    def _ended(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        call.ended = True
        if call.method == Service.STREAM:
            self._next(sid, call)  # the client's end: the trailers once every message is answered
        elif call.task is None and not call.busy:
            self._fail(sid, call, INVALID_ARGUMENT, f"{call.method} got no request message")

    def _next(self, sid: int, call: _Call) -> None:
        """ModelStreamInfer: the next message into the batch once the one before is answered."""
        if call.busy or self.calls.get(sid) is not call:
            return
        if call.queue:
            call.busy = True
            self.service.infer_soon(call.queue.popleft(),
                                    lambda answer, error: self._answered(sid, call, answer, error), stream=True)
        elif call.ended:
            self._finish(sid, 0)
            self._flush()

    def _answered(self, sid: int, call: _Call, answer: bytes | None, error: GrpcError | None) -> None:
        """A ModelInfer's or a stream message's answer, from the batch run (or at once when refused)."""
        call.busy = False
        if self.calls.get(sid) is not call:
            return  # reset, or the connection dropped, while it ran: nobody to answer
        if error is not None:
            self._finish(sid, error.code, str(error))
        else:
            self._send(sid, call, answer)
            if call.method != Service.STREAM:
                self._finish(sid, 0)
        self._flush()
        if call.method == Service.STREAM:
            self._next(sid, call)

    async def _unary(self, sid: int, call: _Call, message: bytes) -> None:
        try:
            answer = await self.service.call(call.method, message)
        except GrpcError as e:
            self._finish(sid, e.code, str(e))
        except Exception as e:  # noqa: BLE001 -- one line, never a dropped connection
            self._finish(sid, INTERNAL, describe(e))
        else:
            self._send(sid, call, answer)
            self._finish(sid, 0)
        self._flush()

    def _send(self, sid: int, call: _Call, message: bytes) -> None:
        if self.calls.get(sid) is not call:
            return  # reset or dropped meanwhile
        if not call.started:
            self.conn.send_headers(sid, HEADERS)
            call.started = True
        call.pending.append(b"\0" + struct.pack(">I", len(message)) + message)
        self._resume(sid)

    def _resume(self, sid: int) -> None:
        call = self.calls.get(sid)
        if call is None:
            return
        while call.pending:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                return  # WINDOW_UPDATE resumes it
            head = call.pending[0]
            self.conn.send_data(sid, head[:window])
            if len(head) > window:
                call.pending[0] = head[window:]
            else:
                call.pending.pop(0)
        if call.trailers is not None and not call.pending:
            self.conn.send_headers(sid, call.trailers, end_stream=True)
            self.calls.pop(sid, None)

    def _finish(self, sid: int, code: int, message: str = "") -> None:
        """Trailers (or a trailers-only answer) once the data sent so far has left."""
        from h2.exceptions import StreamClosedError
        call = self.calls.get(sid)
        trailers = _trailers(code, message)
        if call is None or not call.started:
            try:
                self.conn.send_headers(sid, HEADERS + trailers, end_stream=True)
            except StreamClosedError:  # the client reset it meanwhile: nobody to tell
                pass
            self.calls.pop(sid, None)
            return
        call.trailers = trailers
        self._resume(sid)

    def _fail(self, sid: int, call: _Call, code: int, message: str) -> None:
        if call.task is not None:
            call.task.cancel()
        call.pending.clear()
        self._finish(sid, code, message)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)


async def start(service: Service, host: str, port: int):
    """An asyncio server speaking gRPC for `service` on host:port, on the running loop."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: GrpcProtocol(service), host, port, reuse_address=True)
