"""Stateful streaming over an ONNX model with (h, c) inputs and outputs, many streams on one runtime.

`open()` a stream, `feed(stream, chunk)` returns the outputs and keeps the state, `close(stream)`.
Concurrent feeds are batched continuously: a worker thread takes every request waiting when the
runtime comes free (at most `max_batch`), stacks those with the same chunk shape along the batch
axis with their states, runs once, and splits the results; the requests that arrive during a run
form the next batch. On an event loop (`feed_async`, `submit`) the requests of one loop turn form
a batch that runs on the loop's own thread. A request alone never waits for company unless
`max_wait_ms` > 0 asks for bigger batches at that cost. The LSTM treats batch rows independently,
so a batched result equals feeding each stream alone (to float rounding of the batched GEMM).
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from lstm_export.common.errors import UserError
from lstm_export.data import Vocab
from lstm_export.runtimes.base import Runtime, RuntimeOptions, create
from lstm_export.runtimes.model_io import TensorSpec
from lstm_export.runtimes.source import open_model

from .completions import Direct, LoopFuture

# The longest chunk feed_async runs on the event loop's thread. A step of a 2x256 LSTM takes ~40 us on
# one core, so a 32-step batch holds the loop for about a millisecond; a thread hop costs ~50 us.
INLINE_STEPS = 32


class StreamError(UserError):
    """A request the server should answer with a 4xx: unknown stream, bad chunk, too many streams."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class _Stream:
    h: np.ndarray  # (L, H): this stream's column of the (L, B, H) state
    c: np.ndarray
    last_used: float
    busy: bool = False
    chunks: int = 0
    steps: int = 0  # time steps consumed since the stream began (carried in a state token)


@dataclass
class _Request:
    stream_id: str
    chunk: np.ndarray
    future: Future = field(default_factory=Future)  # or an asyncio.Future, a LoopFuture or a Direct


@dataclass
class StreamingStats:
    """Counters a server exports: open streams, batches run and their sizes."""

    batches: int = 0
    rows: int = 0
    batch_sizes: dict = field(default_factory=dict)  # size -> count
    expired: int = 0


class StreamingSession:
    """Many streams sharing one runtime session over a streaming graph (see module docstring).

    Args:
        model: an ONNX model (path, compiled folder or source.ModelSource) with inputs
            (data, h_0, c_0) and outputs (data, h_n, c_n), as `lstm-export export --mode streaming` writes.
        runtime: a runtime name ("ort-cpu", "ort-cuda", "tvm-llvm") or a Runtime object.
        max_batch: most chunks run together.
        max_wait_ms: how long the batcher may wait for more chunks after those already queued
            (default 0: none; it runs what is there as soon as the runtime is free).
        max_streams: open streams allowed at once.
        idle_timeout_s: streams unused this long are closed.
        max_chunk: longest chunk (time steps) accepted.
        ort_spinning: for an ONNX Runtime named by `runtime`, let its threads spin after runs.
        ort_threads: for an ONNX Runtime named by `runtime`, its intra-op threads (None: ORT's default).
    """

    def __init__(self, model, runtime: str | Runtime = "ort-cpu", max_batch: int = 16, max_wait_ms: float = 0.0,
                 max_streams: int = 1024, idle_timeout_s: float = 600.0, max_chunk: int = 4096,
                 ort_spinning: bool = False, ort_threads: int | None = None):
        self.source = source = open_model(model)  # read once, here
        ins, outs = source.inputs, source.outputs
        names = [s.name for s in ins]
        if "h_0" not in names or "c_0" not in names or len(ins) != 3:
            raise UserError(f"{model} is not a streaming graph: expected inputs (data, h_0, c_0), got {names}; "
                            "export it with --mode streaming")
        self.data_spec: TensorSpec = next(s for s in ins if s.name not in ("h_0", "c_0"))
        self.state_spec = next(s for s in ins if s.name == "h_0")  # (L, batch, H)
        self.output_names = [s.name for s in outs]
        self.metadata = source.metadata()
        cfg = self.metadata.get("lstm_export.config", {})
        # Where batch and time sit in the data input: tokens (B, T); input (T, B, I) or (B, T, I).
        self.batch_axis = 0 if (self.data_spec.name == "tokens" or cfg.get("batch_first")) else 1
        chars = self.metadata.get("lstm_export.vocab")
        self.vocab = Vocab(chars) if chars else None
        # the ids a token chunk may hold: the vocabulary's, within the table the graph gathers from.
        # check_chunk is the only check a chunk gets: batches run with run_checked (the state is ours)
        tables = [n for n in (len(self.vocab) if self.vocab else None,
                              source.index_bounds.get(self.data_spec.name)) if n is not None]
        self._ids = min(tables) if tables else None
        self.layers, self.hidden = int(self.state_spec.shape[0]), int(self.state_spec.shape[2])
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.max_streams, self.idle_timeout, self.max_chunk = max_streams, idle_timeout_s, max_chunk
        # ONNX Runtime's threads sleep between runs unless asked (lstm_export/runtimes/ort.py)
        if isinstance(runtime, str):
            ort = runtime.startswith("ort")  # threads means another thing to TVM (the layout it compiles)
            runtime = create(runtime, RuntimeOptions(spin=ort_spinning, threads=ort_threads if ort else None))
        self.runtime = runtime
        self.runtime.prepare(source)
        self.stats = StreamingStats()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        # held for each runtime call: a feed that finds it free and nobody queued runs in its own
        # thread at once (no hop through the batcher and back); the batcher takes what queues meanwhile
        self._run_lock = threading.Lock()
        self._loop_pending: list[_Request] = []  # feed_async's requests of this loop iteration
        self._loop_timer = None  # with max_wait: the pending batch's run
        self._worker = threading.Thread(target=self._loop, name="lstm-export-batcher", daemon=True)
        self._worker.start()

    # --- streams -------------------------------------------------------------------------------
    def open(self, state=None) -> str:
        """A new stream from the zero state, or from `state` (a state_token.StreamState: h, c, steps)."""
        with self._lock:
            self._expire_locked()
            if len(self._streams) >= self.max_streams:
                raise StreamError(f"too many open streams ({self.max_streams}); close some or wait for idle "
                                  "ones to expire", status=429)
            sid = uuid.uuid4().hex
            if state is None:
                z = np.zeros((self.layers, self.hidden), np.float32)
                self._streams[sid] = _Stream(z, z.copy(), time.monotonic())
            else:
                self._streams[sid] = _Stream(np.array(state.h, np.float32), np.array(state.c, np.float32),
                                             time.monotonic(), steps=int(state.steps))
            return sid

    def state(self, stream_id: str):
        """The stream's state now, as a state_token.StreamState."""
        from .state_token import StreamState
        with self._lock:
            st = self._streams.get(stream_id)
            if st is None:
                raise StreamError(f"unknown stream {stream_id!r}", status=404)
            return StreamState(st.h.copy(), st.c.copy(), st.steps)

    def close(self, stream_id: str) -> None:
        with self._lock:
            if self._streams.pop(stream_id, None) is None:
                raise StreamError(f"unknown stream {stream_id!r}", status=404)

    @property
    def open_streams(self) -> int:
        """Streams open now (idle ones past the timeout are expired first, so metrics never count them)."""
        with self._lock:
            self._expire_locked()
            return len(self._streams)

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for sid in [s for s, st in self._streams.items() if not st.busy and now - st.last_used > self.idle_timeout]:
            del self._streams[sid]
            self.stats.expired += 1

    # --- feeding -------------------------------------------------------------------------------
    def check_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """Validates one stream's chunk: tokens (T,) int, or features (T, I) float32."""
        spec = self.data_spec
        chunk = np.asarray(chunk)
        want_rank = len(spec.shape) - 1
        if chunk.ndim != want_rank:
            raise StreamError(f"chunk has rank {chunk.ndim}, expected {want_rank} "
                              f"({'time steps' if want_rank == 1 else 'time steps x features'})")
        if chunk.shape[0] < 1 or chunk.shape[0] > self.max_chunk:
            raise StreamError(f"chunk has {chunk.shape[0]} steps; send 1 to {self.max_chunk}", status=413
                              if chunk.shape[0] > self.max_chunk else 400)
        if np.dtype(spec.dtype).kind in "iu":
            if chunk.dtype.kind not in "iu":
                raise StreamError(f"chunk must hold integer token ids, got {chunk.dtype}")
            if self._ids is not None:
                wide = chunk.astype(np.int64 if chunk.dtype.kind == "i" else np.uint64, copy=False)
                if int(wide.view(np.uint64).max()) >= self._ids:  # one pass: as uint64 a negative id is huge
                    raise StreamError(
                        f"token ids must be in [0, {self._ids}), got {int(chunk.min())}..{int(chunk.max())}")
            return chunk.astype(spec.dtype, copy=False)
        feat = spec.shape[-1]
        if isinstance(feat, int) and chunk.shape[-1] != feat:
            raise StreamError(f"chunk has {chunk.shape[-1]} features, expected {feat}")
        if not np.isfinite(chunk).all():
            raise StreamError("chunk holds NaN or Inf")
        return chunk.astype(spec.dtype, copy=False)

    def feed(self, stream_id: str, chunk, timeout: float | None = 60.0) -> dict[str, np.ndarray]:
        """Runs one chunk for one stream; returns its outputs (batch axis removed) and keeps the state."""
        chunk = self.check_chunk(chunk)
        with self._lock:
            if stream_id not in self._streams:
                raise StreamError(f"unknown stream {stream_id!r}", status=404)
        req = _Request(stream_id, chunk)
        # with max_wait > 0 the user asked for fuller batches: every request then goes through the batcher
        if self.max_wait == 0 and self._queue.empty() and self._run_lock.acquire(blocking=False):
            try:
                if self._queue.empty():  # still nobody waiting: this request alone, now
                    self._run_group([req])
                    return req.future.result(timeout=0)
            finally:
                self._run_lock.release()
        self._queue.put(req)
        return req.future.result(timeout=timeout)

    def feed_async(self, stream_id: str, chunk) -> asyncio.Future:
        """feed() for a caller on an event loop's thread: the outputs arrive on the returned future.

        The chunks submitted during one loop iteration run as one batch when the iteration's ready
        callbacks are done (an HTTP server parses every request that arrived before any runs), or,
        with max_wait_ms, up to that long after the first of them or when max_batch have come. The
        batch runs right there on the loop's thread when the runtime is free and its chunks are short
        (at most INLINE_STEPS steps: a fraction of a millisecond for a streaming LM), so a request
        costs no thread hop; the loop does nothing else meanwhile. Longer chunks, and batches that
        find the runtime held by another thread, go to the batcher thread: the loop stays free."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(stream_id, chunk, future, loop)
        return future

    def submit(self, stream_id: str, chunk, done) -> None:
        """feed_async() with a callback instead of a future: done(outputs, None) or done(None, error)
        is called on the loop's thread as soon as the batch has run, within the run's own callback (no
        future to resume, no task). A bad chunk or an unknown stream raises here, as in feed()."""
        loop = asyncio.get_running_loop()
        self._enqueue(stream_id, chunk, Direct(done), loop)

    def _enqueue(self, stream_id: str, chunk, future, loop) -> None:
        chunk = self.check_chunk(chunk)
        with self._lock:
            if stream_id not in self._streams:
                raise StreamError(f"unknown stream {stream_id!r}", status=404)
        self._loop_pending.append(_Request(stream_id, chunk, future))
        if len(self._loop_pending) == 1:  # the first of a batch: its run is scheduled now
            if self.max_wait == 0:
                loop.call_soon(self._run_loop_batch, loop)
            else:  # the user asked for fuller batches: up to max_wait for company, or a full batch
                self._loop_timer = loop.call_later(self.max_wait, self._run_loop_batch, loop)
        elif len(self._loop_pending) == self.max_batch and self._loop_timer is not None:
            self._loop_timer.cancel()
            loop.call_soon(self._run_loop_batch, loop)

    def _run_loop_batch(self, loop) -> None:
        if self._loop_timer is not None:
            self._loop_timer.cancel()
            self._loop_timer = None
        pending, self._loop_pending = self._loop_pending, []
        if not pending:
            return
        short = all(r.chunk.shape[0] <= INLINE_STEPS for r in pending)
        if short and self._queue.empty() and self._run_lock.acquire(blocking=False):
            try:
                self._run_batches(pending)
            finally:
                self._run_lock.release()
            return
        for r in pending:  # to the batcher thread's queue; the loop resumes each waiter when it is done
            r.future = LoopFuture(r.future, loop)
            self._queue.put(r)

    def feed_text(self, stream_id: str, text: str) -> dict[str, np.ndarray]:
        if self.vocab is None:
            raise StreamError("this model carries no vocabulary; send token ids")
        unknown = self.vocab.unknown(text)
        if unknown:
            raise StreamError(f"characters not in the model's vocabulary: {unknown[:10]!r}")
        return self.feed(stream_id, np.array(self.vocab.ids(text), np.int64))

    # --- the batcher ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            with self._run_lock:  # the runtime is free: all that queued during the last run joins
                pending = [first]
                deadline = time.monotonic() + self.max_wait
                while len(pending) < self.max_batch:
                    # what is queued already joins without waiting; then up to max_wait for more
                    left = deadline - time.monotonic()
                    try:
                        nxt = self._queue.get_nowait() if left <= 0 else self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)
                        break
                    pending.append(nxt)
                self._run_batches(pending)

    def _run_batches(self, pending: list[_Request]) -> None:
        """Groups by chunk shape, one chunk per stream per run (a stream's later chunk waits its turn)."""
        while pending:
            group, rest, seen = [], [], set()
            shape = pending[0].chunk.shape
            for r in pending:
                if r.chunk.shape == shape and r.stream_id not in seen and len(group) < self.max_batch:
                    group.append(r)
                    seen.add(r.stream_id)
                else:
                    rest.append(r)
            self._run_group(group)
            pending = rest

    def _run_group(self, group: list[_Request]) -> None:
        live = []
        with self._lock:
            for r in group:
                st = self._streams.get(r.stream_id)
                if st is None:
                    if not r.future.done():
                        r.future.set_exception(StreamError(f"unknown stream {r.stream_id!r} (closed or expired)",
                                                           404))
                else:
                    st.busy = True
                    live.append((r, st))
        if not live:
            return
        try:
            if len(live) == 1:  # views with a batch axis of 1: np.stack costs more than the rest of a request
                (r, st), = live
                data = r.chunk[None] if self.batch_axis == 0 else r.chunk[:, None]
                h, c = st.h[:, None], st.c[:, None]  # (L, 1, H)
            else:
                data = np.stack([r.chunk for r, _ in live], axis=self.batch_axis)  # chunks along the batch axis
                h = np.stack([st.h for _, st in live], axis=1)  # (L, B, H)
                c = np.stack([st.c for _, st in live], axis=1)
            out = self.runtime.run_checked({self.data_spec.name: data, "h_0": h, "c_0": c})
        except Exception as e:  # the runtime failed: every caller in the batch hears why
            with self._lock:
                for _, st in live:
                    st.busy = False
            for r, _ in live:
                if not r.future.done():  # a waiter on an event loop may have been cancelled
                    r.future.set_exception(e)
            return
        names = self.output_names
        y, h_n, c_n = out[names[0]], out[names[1]], out[names[2]]
        now = time.monotonic()
        one = len(live) == 1  # then h_n[:, 0] is all of h_n, which nothing else holds: no copy, and
        if one:  # the caller's h_n and c_n views of the state are read-only: they cannot edit it
            h_n.flags.writeable = c_n.flags.writeable = False
        with self._lock:
            self.stats.batches += 1
            self.stats.rows += len(live)
            self.stats.batch_sizes[len(live)] = self.stats.batch_sizes.get(len(live), 0) + 1
            for k, (r, st) in enumerate(live):
                st.h, st.c = (h_n[:, 0], c_n[:, 0]) if one else (h_n[:, k].copy(), c_n[:, k].copy())
                st.last_used, st.busy = now, False
                st.chunks += 1
                st.steps += int(r.chunk.shape[0])
        for k, (r, _) in enumerate(live):
            if not r.future.done():
                r.future.set_result({names[0]: y[k] if self.batch_axis == 0 else y[:, k],
                                     names[1]: h_n[:, k], names[2]: c_n[:, k]})

    def shutdown(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=5)
        self.runtime.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
