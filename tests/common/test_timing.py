"""The one timing loop and ratio: sample counts and blocks against counters kept by the test."""
import time

import numpy as np
import pytest

from lstm_export.common.agreement import output_error
from lstm_export.common.timing import ratio_to_best, time_runs


def test_samples_and_warmup():
    calls = []
    times = time_runs(lambda: calls.append(1), warmup=3, min_runs=7, min_s=0.0)
    assert len(times) == 7 and len(calls) == 3 + 7


def test_blocks_between_syncs_divide_by_their_length():
    calls, syncs = [], []

    def fn():
        calls.append(1)
        time.sleep(0.001)

    times = time_runs(fn, warmup=2, min_runs=4, max_runs=4, min_s=0.0, sync=lambda: syncs.append(1), block_s=0.01)
    per_block = (len(calls) - 2 - 1) // 4  # warm-up and the one call that sized the block
    assert per_block >= 5 and len(calls) == 3 + 4 * per_block
    assert all(0.0009 < t < 0.01 for t in times)  # one call's time, not a block's
    assert len(syncs) == 2 + 2 * 4  # after warm-up and the sizing call, then around every block


def test_ratio_ignores_missing_peers():
    assert ratio_to_best(3.0, [None, 2.0, 6.0]) == 1.5
    assert ratio_to_best(None, [2.0]) is None and ratio_to_best(3.0, [None]) is None


def test_a_tiny_ratio_keeps_its_digits():
    """A 0.0137 ms entry against a peer slowed to 30 ms (a suite's other worker holding its cores)
    rounded to 0.0 at 3 decimals, a ratio no reader can use."""
    assert ratio_to_best(0.0137, [30.0]) == pytest.approx(0.0004567, rel=1e-3)
    assert ratio_to_best(62.0139, [71.9749]) == 0.8616


@pytest.mark.parametrize("got,ok", [([1.0, 2.0 + 1e-6], True), ([1.0, 2.1], False), ([1.0], False),
                                    ([1.0, np.nan], False)])
def test_output_error_policy(got, ok):
    ref = np.array([1.0, 2.0])
    assert output_error("y", np.array(got), ref, atol=1e-5, rtol=0.0).passed is ok
    both_nan = output_error("y", np.array([np.nan]), np.array([np.nan]), atol=0.0, rtol=0.0)
    assert both_nan.passed and both_nan.note == "NaN in reference"


def test_before_runs_untimed_before_every_sample():
    calls = []
    times = time_runs(lambda: calls.append("fn"), warmup=1, min_runs=3, min_s=0, max_runs=3,
                      before=lambda: (calls.append("before"), time.sleep(0.02)))
    assert calls == ["fn"] + ["before", "fn"] * 3
    assert max(times) < 0.02  # the sleep in `before` is not in any sample
