"""The import path: TVM's ONNX frontend with our LSTM, GRU, RNN and checked Gather converters
registered for the duration of one import, without editing TVM's files. It sits above every
converter module (each of them imports only downward)."""
from __future__ import annotations

import contextlib
import threading

import tvm
from tvm.relax.frontend.onnx import onnx_frontend

from lstm_export.common.errors import UserError

from .convert_options import DEFAULT, ConvertOptions
from .flip import FlipSlice
from .gather import SafeGather, SafeGatherElements, SafeGatherND
from .gru_rnn import GRU, RNN
from .lstm import LSTM

CONVERTERS = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN, "Gather": SafeGather, "GatherElements": SafeGatherElements,
              "GatherND": SafeGatherND, "Slice": FlipSlice}


def _bound(converter, options: ConvertOptions):
    """`converter` holding this import's options. TVM 0.27's importer calls a converter class's
    `_impl_vN` class methods with (bb, inputs, attr, params) and passes nothing of the caller's, so
    a subclass whose `options` attribute is this import's is the one way in; it is made here only."""
    return type(converter.__name__, (converter,), {"options": options})


@contextlib.contextmanager
def lstm_registered(options: ConvertOptions = DEFAULT):
    """Within this block TVM's ONNX importer knows LSTM, GRU and RNN, and its Gather, GatherElements and
    GatherND check indices on the CPU (gather.py), each converter with `options`; TVM's files are
    not touched.

    TVM 0.27 takes no converter table from the caller, so the block swaps the frontend's table
    getter; the lock makes imports in other threads wait instead of seeing another block's options."""
    ours = {op: _bound(c, options) for op, c in CONVERTERS.items()}
    with _CONVERT_MAP_LOCK:
        original = onnx_frontend._get_convert_map

        def with_lstm():
            table = dict(original())
            table.update(ours)
            return table

        importer = onnx_frontend.ONNXGraphImporter
        convert = importer._convert_operator

        def named(self, op_name, inputs, attrs, opset):  # a converter's failure, with the node it was on
            try:
                return convert(self, op_name, inputs, attrs, opset)
            except (UserError, tvm.error.OpNotImplemented, ConvertFailure):
                raise
            except Exception as e:
                raise ConvertFailure(op_name, attrs.get("tvm_custom", {}).get("name") or "", e) from e

        onnx_frontend._get_convert_map, importer._convert_operator = with_lstm, named
        try:
            yield
        finally:
            onnx_frontend._get_convert_map, importer._convert_operator = original, convert


class ConvertFailure(Exception):
    """TVM's converter for `op` failed on the node called `node` (in any graph: TVM's importer
    names only top-level nodes in what it prints) with `cause`."""

    def __init__(self, op: str, node: str, cause: Exception):
        super().__init__(f"{op} node {node!r}: {cause}")
        self.op, self.node, self.cause = op, node, cause


_CONVERT_MAP_LOCK = threading.RLock()
