"""onnx.reference.ReferenceEvaluator: slow, plain numpy, independent of every optimised runtime."""
from __future__ import annotations

import numpy as np

from lstm_export.errors import UserError

from .base import Availability, Runtime
from .model_io import load_onnx


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

    def prepare(self, model) -> None:
        from onnx.reference import ReferenceEvaluator
        proto = load_onnx(model)
        for node in proto.graph.node:  # its RNN kernels ignore sequence_lens: refuse rather than be wrong
            if node.op_type in ("LSTM", "GRU", "RNN") and len(node.input) > 4 and node.input[4]:
                raise UserError(f"onnx-reference ignores {node.op_type} sequence_lens (node {node.name!r}) and would "
                                "return wrong numbers; run variable-length models on ort-cpu or torch")
        try:
            self.evaluator = ReferenceEvaluator(proto)
        except Exception as e:
            raise UserError(f"onnx-reference cannot load the model: {str(e).strip().splitlines()[0][:200]}") from None
        self.output_names = [o.name for o in proto.graph.output]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.evaluator.run(None, feeds)
        return {n: np.asarray(v) for n, v in zip(self.output_names, outs)}

    def release(self) -> None:
        self.evaluator = None
