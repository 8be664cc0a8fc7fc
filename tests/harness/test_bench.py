"""`lstm-export bench`: outputs checked against torch.nn.LSTM before timing, interleaved rounds, the report."""
import json

import pytest

from lstm_export.common.timing import time_runs
from lstm_export.harness import bench as bench_mod
from lstm_export.harness.bench import PEERS, Shape, bench

TINY = Shape(3, 2, 4, 8)  # microseconds per run: the harness, not the speed, is under test
ENTRIES = ["torch.nn.LSTM", "ort-cpu native", "torch (ours)"]


class _Logged:
    """A runtime whose run calls are logged (and, with `shift`, whose outputs are wrong)."""

    def __init__(self, rt, label, log, shift=0.0):
        self.rt, self.label, self.log, self.shift = rt, label, log, shift

    def prepare(self, model):
        self.rt.prepare(model)

    def run(self, feeds):
        self.log.append(self.label)
        return {k: v + self.shift for k, v in self.rt.run(feeds).items()}

    def run_checked(self, feeds):  # what the timing loop calls, feeds checked once by run
        return self.run(feeds)

    def time_runs(self, feeds, **kwargs):  # Runtime.time_runs, through the logged calls
        from lstm_export.common.timing import time_runs
        return time_runs(lambda: self.run_checked(feeds), **kwargs)

    def release(self):
        self.rt.release()


class _TimedHere:
    """bench_alone.FreshPeer, but timing the runtime the bench checked in this process: the log sees
    every run (test_peers_are_timed_in_a_fresh_process_each_round covers the real one)."""

    def __init__(self, entry, shape, threads, target, checked):
        self.rt = checked

    def time_runs(self, feeds, **kw):
        return time_runs(lambda: self.rt.run_checked(feeds), **kw)

    def release(self):
        self.rt.release()


def _logging_runtimes(monkeypatch, log, wrong=()):
    real = bench_mod._runtime
    monkeypatch.setattr(bench_mod, "FreshPeer", _TimedHere)

    def logged(name, model, threads, target=None, feeds=None):
        return _Logged(real(name, model, threads, target, feeds), name, log, shift=1e-2 if name in wrong else 0.0)

    monkeypatch.setattr(bench_mod, "_runtime", logged)


def test_every_entry_is_checked_against_torch_then_timed_in_interleaved_rounds(monkeypatch):
    log = []
    _logging_runtimes(monkeypatch, log)
    report = bench([TINY], ENTRIES, threads=1, min_s=0.03, rounds=3, progress=False)
    by = {t.entry: t for t in report.timings}
    assert list(by) == ENTRIES
    for t in report.timings:
        assert t.status == "ok" and t.max_err < 1e-5, t
        assert t.runs >= 3 and 0 < t.median_ms <= t.p90_ms <= t.p99_ms
    best = min(by[p].median_ms for p in PEERS if p in by)
    assert by["torch (ours)"].ratio_to_best_peer == pytest.approx(by["torch (ours)"].median_ms / best, rel=1e-3)
    # the log: the reference run, each entry's check run, then timing blocks A B C A B C A B C
    names = ["torch-nn", "ort-cpu", "torch"]
    timed = log[4:]
    blocks = [n for i, n in enumerate(timed) if i == 0 or timed[i - 1] != n]
    assert log[:4] == ["torch-nn"] + names and blocks == names * 3


def test_a_wrong_answer_is_a_mismatch_and_is_never_timed(monkeypatch):
    log = []
    _logging_runtimes(monkeypatch, log, wrong={"ort-cpu"})
    report = bench([TINY], ENTRIES, threads=1, min_s=0.03, rounds=2, progress=False)
    ort = next(t for t in report.timings if t.entry == "ort-cpu native")
    assert ort.status == "mismatch" and ort.max_err == pytest.approx(1e-2, rel=1e-3)
    assert ort.median_ms is None and ort.ratio_to_best_peer is None and ort.runs == 0
    assert log.count("ort-cpu") == 1  # its check run only
    others = [t for t in report.timings if t.entry != "ort-cpu native"]
    assert all(t.status == "ok" and t.median_ms for t in others)


def test_an_entry_that_fails_mid_timing_keeps_the_others(monkeypatch):
    real = bench_mod._runtime

    class Flaky(_Logged):
        def run(self, feeds):
            self.log.append(1)
            if len(self.log) > 5:  # the check and the first warm-up runs pass
                raise RuntimeError("device lost")
            return self.rt.run(feeds)

    monkeypatch.setattr(bench_mod, "_runtime", lambda name, model, threads, target=None, feeds=None: (
        Flaky(real(name, model, threads), name, []) if name == "ort-cpu" else real(name, model, threads)))
    monkeypatch.setattr(bench_mod, "FreshPeer", _TimedHere)
    report = bench([TINY], ENTRIES, threads=1, min_s=0.03, rounds=2, progress=False)
    ort = next(t for t in report.timings if t.entry == "ort-cpu native")
    assert ort.status == "error: RuntimeError: device lost" and ort.median_ms is None
    assert all(t.status == "ok" and t.median_ms for t in report.timings if t.entry != "ort-cpu native")


def test_peers_are_timed_in_a_fresh_process_each_round(monkeypatch):
    """A peer's rounds each run in a new process of its own (bench_alone.AloneWorker), after the
    bench's process checked its output; our entries are timed in the bench's process."""
    from lstm_export.harness import bench_alone
    started = []

    class Fresh:  # a fresh process that reads 2 ms a run
        def __init__(self, entry, shape, threads, target):
            started.append(entry)

        def time_runs(self, **kw):
            return [0.002] * kw["min_runs"]

        def release(self):
            pass

    monkeypatch.setattr(bench_alone, "AloneWorker", Fresh)
    report = bench([TINY], ENTRIES, threads=1, min_s=0.03, rounds=3, progress=False)
    by = {t.entry: t for t in report.timings}
    assert sorted(started) == ["ort-cpu native"] * 3 + ["torch.nn.LSTM"] * 3
    assert by["ort-cpu native"].median_ms == by["torch.nn.LSTM"].median_ms == 2.0
    assert by["torch (ours)"].status == "ok" and by["torch (ours)"].median_ms < 1.0  # timed here


def test_cli_writes_json_markdown_and_plot(cli, tmp_path):
    out = tmp_path / "b"
    r = cli("bench", "--only-shapes", "--shape", "3,2,4,8", "--entries", "torch.nn.LSTM,ort-cpu native",
            "--min-s", "0.05", "--rounds", "2", "--threads", "1", "--json", f"{out}.json",
            "--markdown", f"{out}.md", "--plot", f"{out}.png")
    assert r.returncode == 0, r.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["threads"] == 1 and [t["entry"] for t in report["timings"]] == ["torch.nn.LSTM", "ort-cpu native"]
    assert all(t["status"] == "ok" and t["runs"] >= 2 for t in report["timings"])
    assert min(t["ratio_to_best_peer"] for t in report["timings"]) == 1.0
    md = out.with_suffix(".md").read_text()
    assert "2 interleaved rounds" in md and "| T3 B2 I4 H8 L1 | ort-cpu native |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ONE = ["--only-shapes", "--shape", "2,1,3,4"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--shape", "3,2,x"], "--shape expects T,B,I,H"),
        (ONE + ["--entries", "nope"], "unknown bench entries"),
        (ONE + ["--rounds", "0"], "argument --rounds: must be an integer from 1 to 1000, got 0"),
        (["--only-shapes"], "--only-shapes needs"),
    ],
)
def test_bad_bench_arguments_say_what_to_do(cli, args, needle):
    r = cli("bench", "--min-s", "0.01", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.tvm
def test_deployed_artifact_and_machine_description(tmp_path):
    """The deployed entry compiles the native graph, loads model.so in a fresh process with no
    TVM_NUM_THREADS (TVM's runtime alone) and times it there: its outputs pass the same check
    against torch.nn.LSTM and it gets a ratio; the report says where it ran (ISA, caches, the FMA
    peak measured now) and each TVM entry's % of that peak."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    report = bench([TINY], ["torch.nn.LSTM", "tvm-llvm native (deployed)"], threads=2, min_s=0.05, rounds=2,
                   progress=False)
    dep = next(t for t in report.timings if t.entry == "tvm-llvm native (deployed)")
    assert dep.status == "ok" and dep.max_err < 1e-5 and dep.runs >= 2 and dep.ratio_to_best_peer > 0
    cpu = report.cpu
    assert cpu["kernel_isa"] == cpu["machine_isa"] and cpu["fma_peak_gflops"] > 1
    assert cpu["l2_kb"] > 0 and cpu["cores"] >= 1
    assert dep.pct_peak == pytest.approx(100 * dep.gflops / cpu["kernel_peak_gflops"], rel=1e-2)
    assert cpu["machine_isa"] in report.header() and "FMA peak" in report.header()


def test_the_peak_is_the_best_measured_in_the_run(monkeypatch):
    """The FMA peak is measured before the first shape and after each one, and the best is the bar
    every entry's % of peak is read against (a VM's other core is at times taken by the host)."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    real = bench_mod.machine_description
    peaks = iter([100.0, 400.0, 200.0])  # low first, the best after the first shape

    def varying(threads, target=None):
        p = next(peaks)
        return {**real(threads, target), "fma_peak_gflops": p, "kernel_peak_gflops": p}

    monkeypatch.setattr(bench_mod, "machine_description", varying)
    report = bench([Shape(4, 8, 16, 32), Shape(3, 8, 16, 32)], ["torch.nn.LSTM", "tvm-llvm native"], threads=2,
                   min_s=0.02, rounds=1, progress=False)
    assert next(peaks, None) is None, "one measurement before the shapes and one after each"
    assert report.cpu["fma_peak_gflops"] == 400.0 and "FMA peak 400 GFLOP/s" in report.header()
    for t in report.timings:
        # gflops is rounded to 0.1: a tiny shape slowed by the other test worker can round to 0.0
        assert t.gflops >= 0 and t.pct_peak == pytest.approx(100 * t.gflops / 400.0, rel=1e-3, abs=0.05)


def test_reduced_precision_rows_carry_their_error_and_their_own_ratio():
    """ONNX Runtime on the int8-quantized model: checked against torch within int8's tolerance
    (its error recorded, well above fp32's), timed, and compared with the reduced-precision peers
    (itself here) as well as the fp32 ones."""
    report = bench([Shape(4, 3, 16, 32)], ["torch.nn.LSTM", "ort-cpu native", "ort-cpu native int8"], threads=1,
                   min_s=0.03, rounds=1, progress=False)
    by = {t.entry: t for t in report.timings}
    int8 = by["ort-cpu native int8"]
    assert int8.status == "ok" and 1e-5 < int8.max_err < 6e-2, int8
    assert int8.ratio_to_best_reduced == 1.0 and int8.ratio_to_best_peer is not None
    assert by["ort-cpu native"].max_err < 1e-5
    assert "vs best reduced-precision peer" in report.markdown()
