"""onnx.reference.ReferenceEvaluator: slow, plain numpy, independent of every optimised runtime."""
from __future__ import annotations

import numpy as np

from lstm_export.common.errors import UserError

from .base import Availability, Runtime


def _ignored_rnn_features(node) -> list[str]:
    """What onnx's reference RNN kernels silently ignore (checked against ONNX Runtime): a model using
    any of these would get wrong numbers, so the runtime refuses it instead."""
    if node.op_type not in ("LSTM", "GRU", "RNN"):
        return []
    found = []
    if len(node.input) > 4 and node.input[4]:
        found.append("sequence_lens")
    for a in node.attribute:
        if a.name == "clip":
            found.append("clip")
        elif a.name == "input_forget" and a.i:
            found.append("input_forget")
        elif a.name == "activations" and any(x.decode().lower() not in ("sigmoid", "tanh") for x in a.strings):
            found.append("activations")
    return found


class ReferenceRuntime(Runtime):
    name = "onnx-reference"

    def __init__(self):
        self.evaluator = None

    @classmethod
    def availability(cls) -> Availability:
        try:
            import onnx.reference  # noqa: F401
        except ImportError:
            return Availability(False, "onnx is not installed")
        return Availability(True)

    def _prepare(self, source) -> None:
        from onnx.reference import ReferenceEvaluator
        proto = source.onnx()
        for node in proto.graph.node:
            ignored = _ignored_rnn_features(node)
            if ignored:
                raise UserError(f"onnx-reference ignores {node.op_type} {' and '.join(ignored)} (node {node.name!r}) "
                                "and would return wrong numbers; run this model on ort-cpu")
        self.evaluator = ReferenceEvaluator(proto)
        self.output_names = source.output_names

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.evaluator.run(None, feeds)
        return {n: np.asarray(v) for n, v in zip(self.output_names, outs)}

    def _release(self) -> None:
        self.evaluator = None
