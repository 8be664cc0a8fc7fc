"""GRU (both resets) and RNN on the fast CPU kernel (cpu.py with cpu_cells.py): every tile path and
every ISA variant this machine can run, against ONNX Runtime; computed weights keep the portable
loop."""
import dataclasses

import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed")
pytestmark = pytest.mark.tvm

from lstm_export.runtimes.tvm_lstm.frontend.convert_options import ConvertOptions  # noqa: E402
from lstm_export.runtimes.tvm_lstm.kernels.cpu_plan import plan_for  # noqa: E402
from lstm_export.runtimes.tvm_lstm.pipeline.importer import import_onnx  # noqa: E402
from lstm_export.runtimes.tvm_lstm.target.targets import host_target, parse_target  # noqa: E402

from ..marks import one_fast  # noqa: E402
from .rnn_cases import check, rnn_model  # noqa: E402
from .test_tvm_cpu_kernel import _variant_target  # noqa: E402

ALL = ("B", "sequence_lens", "initial_h")


def host_plan(**changes):
    return dataclasses.replace(plan_for(host_target()), **changes)


def kernels(model) -> set[str]:
    """The names of the PrimFuncs the import emits for the model's recurrent node."""
    mod = import_onnx(model, ConvertOptions(plan=host_plan()))
    return {gv.name_hint for gv in mod.functions if "layer_cpu" in gv.name_hint or "_loop_" in gv.name_hint}


@pytest.mark.parametrize("op,attrs,want", [
    ("GRU", {"linear_before_reset": 1}, {"gru_layer_cpu"}),
    ("GRU", {"linear_before_reset": 0}, {"gru_layer_cpu"}),  # two passes a step (cpu_cells.PassLayout)
    ("RNN", {}, {"rnn_layer_cpu"}),
])
def test_constant_weights_take_the_packed_kernel(op, attrs, want):
    assert kernels(rnn_model(op, **attrs)) == want
    assert kernels(rnn_model(op, computed_weights=True, **attrs)) == {f"{op.lower()}_loop_fwd"}


def test_both_directions_of_a_layer_share_one_kernel():
    """The direction is the kernel's argument, so a bidirectional layer builds and compiles one
    kernel (both directions are checked against ONNX Runtime in the tests around this one)."""
    from .lstm_cases import lstm_model
    assert kernels(rnn_model("GRU", 2, direction="bidirectional", linear_before_reset=0)) == {"gru_layer_cpu"}
    assert kernels(lstm_model(2, direction="bidirectional")) == {"lstm_layer_cpu"}


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_computed_weights_run_the_portable_loop(tmp_path, op):
    check(rnn_model(op, 2, 0, ALL, direction="bidirectional", linear_before_reset=1, computed_weights=True)
          if op == "GRU" else rnn_model(op, 2, 0, ALL, direction="bidirectional", computed_weights=True), tmp_path)


# hidden sizes with 16 lanes: GRU 30 = a full block and a 14-unit tail (full blocks only: the LSTM's
# tests). RNN groups are ceil(H/4) units: 97 -> 25 (the last group 22: masked in the tail block),
# 65 -> 17 (a 1-unit tail block; the last group's 14 units end inside the full block).
# GRU0 (linear_before_reset=0) runs two grouped passes: z|r over ceil(2H/4) units, then ceil(H/4):
# 33 -> 17 (a full block and a 1-unit tail) and 9 (a tail only).
SIZES = [("GRU", 30, "batch"), ("GRU", 30, "step"), ("GRU0", 33, "batch"), ("GRU0", 33, "step"), ("RNN", 97, "batch"),
         ("RNN", 65, "batch"), ("RNN", 65, "step")]


def _model(op, *args, **kwargs):
    if op.startswith("GRU"):
        kwargs["linear_before_reset"] = 0 if op == "GRU0" else 1
    return rnn_model(op[:3], *args, **kwargs)


@pytest.mark.parametrize("op,hidden,split", one_fast(SIZES, multi=True))
def test_unit_blocks_and_splits(tmp_path, op, hidden, split):
    """Reverse (the harder step order; both directions: test_gru_rnn.py) with lengths and initial
    state on the batched paths (7 and 13 rows: full and partial tiles) and the row path (2 rows,
    and one streaming step)."""
    plan = host_plan() if split == "batch" else host_plan(batch_split_bytes=0)
    check(_model(op, 1, 0, ALL, direction="reverse", hidden=hidden, inputs_size=7), tmp_path,
          shapes=((3, 7), (2, 13), (4, 2), (1, 1)), plan=plan, atol=2e-5)


@pytest.mark.parametrize("op", one_fast(["RNN", "GRU0"]))
def test_zero_state_and_no_lengths(tmp_path, op):
    """Without initial_h the kernel starts from zero and skips h @ R at the first step; without
    lengths every sequence runs all T steps."""
    check(_model(op, 1, 0, ("B",), direction="reverse", hidden=20), tmp_path,
          shapes=((4, 7), (3, 1)), plan=host_plan())


@pytest.mark.slow  # the shares are the LSTM's (its fast cases run them); here with the GRU cell
@pytest.mark.parametrize("op,threads,split", [("GRU", 3, "batch"), ("GRU0", 3, "step")])
def test_shares_for_any_core_count(tmp_path, op, threads, split):
    """Batch shares of 1 to 8 rows and step shares for 1 or 3 cores (the process runs 2 threads
    whatever the kernel assumed); GRU0's second pass waits for the first at a barrier in the step
    split and the row path."""
    plan = host_plan(threads=threads) if split == "batch" else host_plan(threads=threads, batch_split_bytes=0)
    check(_model(op, 1, 1, ALL, direction="reverse", hidden=20), tmp_path,
          shapes=((3, 13), (4, 20), (2, 5), (3, 1)), plan=plan)


@pytest.mark.parametrize("variant,op", [
    # all slow: the ISA variants of the shared kernel run in the fast subset with the LSTM cell; the
    # host's own ISA runs every test above, so here the narrower ones: 8 and 4 lanes
    pytest.param(v, op, marks=[pytest.mark.slow]) for v, op in (("avx2", "GRU"), ("avx2", "GRU0"), ("sse", "RNN"))])
def test_isa_variants(tmp_path, variant, op):
    """The kernel each ISA gets (lanes 16, 8 or 4), on a full block plus a narrow one, both splits'
    batch sizes, against ONNX Runtime."""
    target = _variant_target(variant)
    lanes = plan_for(parse_target(target)).lanes
    hidden = 2 * lanes + 1 if op.startswith("GRU") else 4 * (2 * lanes + 1) - 2
    plan = plan_for(parse_target(target, threads=2))
    check(_model(op, 1, 0, ALL, direction="reverse", hidden=hidden), tmp_path,
          shapes=((4, 1), (3, 7), (2, 13)), plan=plan, target=target, atol=2e-5)
