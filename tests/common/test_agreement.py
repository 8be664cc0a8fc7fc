"""The tolerance a runtime is held to follows from the precision it computes in."""
from lstm_export.common.agreement import PRECISION_TOLERANCE, output_error, tolerance_for


def test_reduced_precision_widens_the_tolerance_and_fp32_keeps_the_callers():
    assert tolerance_for("fp32", 1e-5, 1e-4) == (1e-5, 1e-4)
    a, r = tolerance_for("bf16", 1e-5, 1e-4)
    assert (a, r) == PRECISION_TOLERANCE["bf16"] and a == 8 * 2.0 ** -8  # 8 units of bf16's roundoff
    assert tolerance_for("int8", 1e-5, 1e-4)[0] > a  # coarser format, wider bound
    assert tolerance_for("bf16", 1.0, 1.0) == (1.0, 1.0)  # a looser caller's bound is kept


def test_a_bf16_sized_error_passes_at_bf16_and_fails_at_fp32():
    import numpy as np
    ref = np.linspace(-1, 1, 64).astype(np.float32)
    got = ref + 4e-3  # one bf16 step near 1
    assert not output_error("y", got, ref, *tolerance_for("fp32", 1e-5, 1e-4)).passed
    assert output_error("y", got, ref, *tolerance_for("bf16", 1e-5, 1e-4)).passed
