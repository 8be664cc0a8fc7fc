"""`numpy-f64`: our model's weights run through the float64 numpy reference (lstm_export.reference).

The oracle for long-sequence fidelity: float32 runtimes are compared against it, step by step.
"""
from __future__ import annotations

import numpy as np

from .torch_runtime import TorchRuntime


class NumpyReferenceRuntime(TorchRuntime):
    name = "numpy-f64"

    def _prepare(self, source) -> None:
        self.module = self._build().eval()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lstm_export.charlm import CharLM
        from lstm_export.reference import lstm_sequence
        lm = self.module if isinstance(self.module, CharLM) else None
        lstm = lm.lstm if lm is not None else self.module
        state = {k: v.detach().double().numpy() for k, v in lstm.state_dict().items()}
        if lm is not None:
            x = lm.embed.weight.detach().double().numpy()[feeds["tokens"]].transpose(1, 0, 2)  # (T, B, E)
        else:
            x = feeds["input"].astype(np.float64)
            x = x.transpose(1, 0, 2) if lstm.batch_first else x
        ln = {"eps": lstm.eps, "forget_bias": lstm.forget_bias} if hasattr(lstm, "eps") else None
        y, h, c = lstm_sequence(state, x, lstm.num_layers, lstm.bidirectional, feeds.get("h_0"), feeds.get("c_0"),
                                feeds.get("lengths"), ln)
        if lm is not None:
            w, b = lm.head.weight.detach().double().numpy(), lm.head.bias.detach().double().numpy()
            return {"logits": y.transpose(1, 0, 2) @ w.T + b, "h_n": h, "c_n": c}
        return {"output": y.transpose(1, 0, 2) if lstm.batch_first else y, "h_n": h, "c_n": c}
