"""Timing runtimes that share the cores: the settle step every timing block starts with, the bench's
alone check, and the shared-cores benchmark's conditions."""
import json
import time

import pytest

from lstm_export.harness.bench import Shape, bench
from lstm_export.harness.bench_alone import off_alone
from lstm_export.harness.bench_report import Timing
from lstm_export.harness.shared_cores import CONDITIONS, BusyThread, markdown, measure, settle


def test_settle_waits_while_another_thread_computes_and_not_otherwise():
    with BusyThread():
        assert settle(max_s=0.3) >= 0.3  # never quiet: waits its whole budget
    t0 = time.perf_counter()
    settle()
    assert time.perf_counter() - t0 < 0.5  # quiet as soon as the busy thread stopped


def test_bench_times_each_peer_alone_in_a_fresh_process():
    """--check-alone: a peer's row also carries its median alone in a fresh process (same settings,
    interleaved with its rounds); our own entries are not peers and carry none."""
    report = bench([Shape(8, 2, 16, 32)], ["ort-cpu native", "torch (ours)"], threads=1, min_s=0.2, rounds=2,
                   progress=False, check_alone=True)
    by = {t.entry: t for t in report.timings}
    ort = by["ort-cpu native"]
    assert ort.status == "ok" and ort.alone_ms > 0
    assert ort.vs_alone == pytest.approx(ort.median_ms / ort.alone_ms, rel=1e-2)
    assert 0.4 < ort.vs_alone < 2.5  # the same runtime on the same shape: the same order (the VM is noisy)
    assert by["torch (ours)"].alone_ms is None


def test_a_row_off_its_alone_timing_is_reported():
    slow = Timing("ort-cpu native int8", "T64 B64 I256 H512 L1", median_ms=48.0, alone_ms=22.0, vs_alone=2.18)
    fine = Timing("ort-cpu native", "T64 B64 I256 H512 L1", median_ms=65.0, alone_ms=63.0, vs_alone=1.03)
    lines = off_alone([slow, fine])
    assert len(lines) == 1 and "ort-cpu native int8" in lines[0] and "22.000 ms alone" in lines[0]


@pytest.mark.tvm
def test_shared_cores_measures_every_runtime_in_every_condition():
    pytest.importorskip("tvm", reason="apache-tvm is not installed")
    rows = measure([Shape(4, 1, 8, 16)], threads=2, rounds=1, min_s=0.05, progress=False)
    assert [r.runtime for r in rows] == ["tvm-llvm native", "tvm-llvm native, TVM's launches",
                                         "tvm-llvm native, one task", "ort-cpu native"]
    for r in rows:
        assert set(r.ms) == set(CONDITIONS) and min(r.ms.values()) > 0
        assert r.vs_quiet["quiet"] == 1.0
    assert all(v == 1.0 for v in rows[-1].vs_ort.values())  # ORT against itself
    assert rows[2].vs_floor["quiet"] == 1.0 and not rows[-1].vs_floor  # the floor is ours, on one task
    assert rows[0].vs_floor["busy thread"] == pytest.approx(rows[0].ms["busy thread"] / rows[2].ms["quiet"], rel=1e-2)
    assert "| T4 B1 I8 H16 L1 | tvm-llvm native |" in markdown(rows, "here")


def test_cli_check_alone_writes_each_peers_alone_time(cli, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", "--shape", "3,2,4,8", "--only-shapes", "--entries", "ort-cpu native,torch (ours)",
            "--check-alone", "--min-s", "0.1", "--rounds", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {t["entry"]: t for t in json.loads(out.read_text())["timings"]}
    assert rows["ort-cpu native"]["alone_ms"] > 0 and rows["torch (ours)"]["alone_ms"] is None
