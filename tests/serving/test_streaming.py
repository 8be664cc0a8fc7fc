"""Streaming sessions: state kept between chunks, concurrent feeds micro-batched with the same results."""
import threading

import numpy as np
import pytest
import torch

from lstm_export import LSTM, UserError
from lstm_export.charlm import CharLM
from lstm_export.config import ModelConfig
from lstm_export.data import Vocab
from lstm_export.export import export_onnx
from lstm_export.serving.streaming import StreamError, StreamingSession


@pytest.fixture(scope="module")
def lm_streaming(tmp_path_factory):
    torch.manual_seed(0)
    lm = CharLM(ModelConfig(vocab_size=12, embed=6, hidden=16, layers=2), Vocab("abcdefghij .")).eval()
    path = export_onnx(lm, tmp_path_factory.mktemp("s") / "lm.streaming.onnx", "streaming")
    return lm, path


def _torch_logits(lm, ids):
    with torch.no_grad():
        logits, _ = lm(torch.as_tensor(ids).unsqueeze(0))
    return logits[0].numpy()


def test_chunks_keep_state_and_equal_one_call(lm_streaming):
    lm, path = lm_streaming
    ids = np.random.default_rng(0).integers(0, 12, 40)
    with StreamingSession(path) as s:
        sid = s.open()
        parts = [s.feed(sid, ids[a:b])["logits"] for a, b in [(0, 7), (7, 8), (8, 40)]]
        np.testing.assert_allclose(np.concatenate(parts), _torch_logits(lm, ids), atol=1e-5)
        s.close(sid)
        with pytest.raises(StreamError, match="unknown stream"):
            s.feed(sid, ids[:3])


def test_concurrent_streams_are_batched_and_never_cross(lm_streaming):
    """16 threads feed interleaved streams with mixed chunk lengths; each equals its stream run alone."""
    lm, path = lm_streaming
    rng = np.random.default_rng(1)
    streams = [rng.integers(0, 12, 30) for _ in range(16)]
    cuts = [[0, 5, 10, 11, 20, 30] if k % 2 else [0, 10, 20, 30] for k in range(16)]
    results = {}
    with StreamingSession(path, max_batch=8, max_wait_ms=20) as s:
        def client(k):
            sid = s.open()
            results[k] = np.concatenate([s.feed(sid, streams[k][a:b])["logits"] for a, b in zip(cuts[k], cuts[k][1:])])
        threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.stats.rows == sum(len(c) - 1 for c in cuts)
        assert max(s.stats.batch_sizes) > 1, "concurrent feeds should have been batched"
    for k in range(16):
        np.testing.assert_allclose(results[k], _torch_logits(lm, streams[k]), atol=1e-5, err_msg=f"stream {k}")


def test_limits_and_bad_chunks(lm_streaming, tmp_path):
    _, path = lm_streaming
    with StreamingSession(path, max_streams=2, max_chunk=8, idle_timeout_s=0.05) as s:
        a = s.open()
        s.open()
        with pytest.raises(StreamError, match="too many open streams") as e:
            s.open()
        assert e.value.status == 429
        for bad, msg in [(np.zeros((2, 2), np.int64), "rank 2"), (np.zeros(9, np.int64), "1 to 8"),
                         (np.array([0.5]), "integer token ids"), (np.array([12]), r"\[0, 12\)")]:
            with pytest.raises(StreamError, match=msg):
                s.feed(a, bad)
        with pytest.raises(StreamError, match="not in the model's vocabulary"):
            s.feed_text(a, "xyz")
        import time
        time.sleep(0.1)
        assert s.open_streams == 0 and s.stats.expired == 2  # idle streams expire, also for the metrics
        s.open()  # so there is room again


def test_feature_models_and_refusals(tmp_path):
    m = LSTM(3, 5, batch_first=True).eval()
    path = export_onnx(m, tmp_path / "s.onnx", "streaming")
    x = np.random.default_rng(0).standard_normal((9, 3)).astype(np.float32)
    with StreamingSession(path) as s:
        sid = s.open()
        y = np.concatenate([s.feed(sid, x[:4])["output"], s.feed(sid, x[4:])["output"]])
        with torch.no_grad():
            ref, _ = m(torch.from_numpy(x).unsqueeze(0))
        np.testing.assert_allclose(y, ref[0].numpy(), atol=1e-5)
        with pytest.raises(StreamError, match="NaN"):
            s.feed(sid, np.full((2, 3), np.nan, np.float32))
        with pytest.raises(StreamError, match="3 features|expected 3"):
            s.feed(sid, np.zeros((2, 4), np.float32))
    native = export_onnx(m, tmp_path / "n.onnx", "native")
    with pytest.raises(UserError, match="not a streaming graph"):
        StreamingSession(native)


def test_streaming_on_tvm_llvm_equals_ort(lm_streaming):
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    _, path = lm_streaming
    ids = np.random.default_rng(3).integers(0, 12, 25)
    outs = {}
    for runtime in ("ort-cpu", "tvm-llvm"):
        with StreamingSession(path, runtime=runtime) as s:
            a, b = s.open(), s.open()
            outs[runtime] = [s.feed(a, ids[:10])["logits"], s.feed(b, ids[:4])["logits"], s.feed(a, ids[10:])["logits"]]
    for x, y in zip(outs["ort-cpu"], outs["tvm-llvm"]):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_batching_is_continuous_and_a_lone_request_never_waits(lm_streaming):
    """max_wait_ms=0 (the default): a request alone runs at once (in its caller's thread), and the
    requests that arrive while a run is in progress form the next batch together. The runtime is ONNX
    Runtime with a gate that holds the first run until four more requests are queued."""
    from lstm_export.runtimes.ort import OrtCpuRuntime
    lm, path = lm_streaming
    release, entered = threading.Event(), threading.Event()

    class Gated(OrtCpuRuntime):
        def _run(self, feeds):
            if not entered.is_set():
                entered.set()
                assert release.wait(10)
            return super()._run(feeds)

    rng = np.random.default_rng(2)
    chunks = [rng.integers(0, 12, 4) for _ in range(5)]
    with StreamingSession(path, Gated(spin=False)) as s:
        assert s.max_wait == 0
        sids = [s.open() for _ in chunks]
        queued, put = [], s._queue.put
        s._queue.put = lambda r: queued.append(r) or put(r)  # counts the requests that had to queue
        out = {}
        threads = [threading.Thread(target=lambda k=k: out.setdefault(k, s.feed(sids[k], chunks[k])["logits"]))
                   for k in range(5)]
        threads[0].start()
        assert entered.wait(10)  # the first request runs alone, with nobody else queued
        for t in threads[1:]:
            t.start()
        while len(queued) < 4:  # the other four wait behind the running one
            threading.Event().wait(0.005)
        release.set()
        for t in threads:
            t.join()
        assert s.stats.batch_sizes == {1: 1, 4: 1}, s.stats.batch_sizes
    for k in range(5):
        np.testing.assert_allclose(out[k], _torch_logits(lm, chunks[k]), atol=1e-5)


def test_serving_sessions_turn_onnx_runtimes_spinning_off(lm_streaming):
    """The ORT session a server runs has its threads' spinning off unless asked (read back from
    ONNX Runtime's own session options)."""
    _, path = lm_streaming
    for spinning in (False, True):
        with StreamingSession(path, "ort-cpu", ort_spinning=spinning) as s:
            entries = s.runtime.session.get_session_options()
            if spinning:
                with pytest.raises(RuntimeError):  # ORT: no such entry
                    entries.get_session_config_entry("session.intra_op.allow_spinning")  # ORT's default: spin
            else:
                assert entries.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_async_feeds_of_one_loop_turn_run_as_one_batch_on_the_loops_thread(lm_streaming):
    """feed_async: the chunks submitted in one event-loop turn run together, on the loop's own thread
    (no hop), and each stream gets what it would alone."""
    import asyncio

    from lstm_export.runtimes.ort import OrtCpuRuntime
    lm, path = lm_streaming
    ran_on = []

    class Recording(OrtCpuRuntime):
        def _run(self, feeds):
            ran_on.append((threading.current_thread().name, feeds["tokens"].shape[0]))
            return super()._run(feeds)

    rng = np.random.default_rng(4)
    chunks = [rng.integers(0, 12, 5) for _ in range(6)]
    with StreamingSession(path, Recording(spin=False)) as s:
        sids = [s.open() for _ in chunks]

        async def main():
            outs = await asyncio.gather(*[s.feed_async(sid, c) for sid, c in zip(sids, chunks)])
            again = await s.feed_async(sids[0], chunks[1])  # the state carries on, as with feed()
            return outs, again, threading.current_thread().name

        outs, again, loop_thread = asyncio.run(main())
    assert ran_on == [(loop_thread, 6), (loop_thread, 1)], ran_on
    for k in range(6):
        np.testing.assert_allclose(outs[k]["logits"], _torch_logits(lm, chunks[k]), atol=1e-5)
    np.testing.assert_allclose(again["logits"], _torch_logits(lm, np.concatenate([chunks[0], chunks[1]]))[5:],
                               atol=1e-5)


def test_async_feeds_go_to_the_batcher_when_long_or_when_the_runtime_is_held(lm_streaming):
    """A chunk past INLINE_STEPS, or a batch that finds another thread running the runtime, runs on the
    batcher thread, and the loop stays free meanwhile (it answers another coroutine); a waiter that
    gave up (cancelled) does not stop the others of its batch from getting their answers."""
    import asyncio

    from lstm_export.runtimes.ort import OrtCpuRuntime
    from lstm_export.serving.streaming import INLINE_STEPS
    lm, path = lm_streaming
    ran_on, gate = [], threading.Event()

    class Gated(OrtCpuRuntime):
        def _run(self, feeds):
            ran_on.append(threading.current_thread().name)
            assert gate.wait(10)
            return super()._run(feeds)

    rng = np.random.default_rng(5)
    long_chunk = rng.integers(0, 12, INLINE_STEPS + 1)
    short = [rng.integers(0, 12, 3) for _ in range(3)]
    with StreamingSession(path, Gated(spin=False), max_chunk=4 * INLINE_STEPS) as s:
        a, b, c, d = (s.open() for _ in range(4))

        async def main():
            long_run = asyncio.ensure_future(s.feed_async(a, long_chunk))
            ticks = 0
            while not ran_on:  # the loop keeps turning while the long chunk runs elsewhere
                ticks += 1
                await asyncio.sleep(0.001)
            held = threading.Thread(target=lambda: s.feed(d, short[2]))  # another thread wants the runtime too
            gate.set()
            out_long = await long_run
            gate.clear()
            held.start()
            while len(ran_on) < 2:
                await asyncio.sleep(0.001)
            gone = s.feed_async(b, short[0])
            kept = s.feed_async(c, short[1])
            await asyncio.sleep(0.01)
            gone.cancel()
            gate.set()
            out = await kept
            held.join()
            return ticks, out_long, out

        ticks, out_long, out = asyncio.run(main())
    assert ticks > 0 and ran_on[0] == "lstm-export-batcher", ran_on
    assert ran_on[-1] == "lstm-export-batcher" and len(ran_on) == 3, ran_on
    np.testing.assert_allclose(out_long["logits"], _torch_logits(lm, long_chunk), atol=1e-5)
    np.testing.assert_allclose(out["logits"], _torch_logits(lm, short[1]), atol=1e-5)


def test_async_feeds_wait_for_company_only_when_asked(lm_streaming):
    """max_wait_ms > 0: a chunk that arrives within the wait joins the first one's batch; max_batch
    chunks run at once without waiting out the rest. At 0 (the default) each loop turn runs what it has."""
    import asyncio
    import time
    lm, path = lm_streaming
    rng = np.random.default_rng(6)
    chunks = [rng.integers(0, 12, 3) for _ in range(3)]

    async def staggered(s, sids, gap):
        first = s.feed_async(sids[0], chunks[0])
        await asyncio.sleep(gap)
        return await asyncio.gather(first, s.feed_async(sids[1], chunks[1]))

    with StreamingSession(path, max_wait_ms=200, max_batch=2) as s:
        sids = [s.open() for _ in chunks]
        t0 = time.perf_counter()
        outs = asyncio.run(staggered(s, sids, 0.02))
        waited = time.perf_counter() - t0
        assert s.stats.batch_sizes == {2: 1}, s.stats.batch_sizes  # the second joined the first
        assert waited < 0.15, waited  # a full batch (max_batch 2) does not wait out the 200 ms
    for k in range(2):
        np.testing.assert_allclose(outs[k]["logits"], _torch_logits(lm, chunks[k]), atol=1e-5)
    with StreamingSession(path) as s:
        sids = [s.open() for _ in chunks]
        asyncio.run(staggered(s, sids, 0.02))
        assert s.stats.batch_sizes == {1: 2}, s.stats.batch_sizes
