"""torch backends over our own model (`torch`) and torch.nn.LSTM with the same weights (`torch-nn`).

Weights come from a checkpoint or a model object, never from the ONNX file, so an export bug
(a gate block in the wrong place, say) cannot cancel itself out in a comparison. Feeds use the
exported graph's names: `input` or `tokens`, optional `h_0`, `c_0`, `lengths`.
"""
from __future__ import annotations

import copy

import numpy as np

from lstm_export.common.errors import UserError

from .base import Availability, Runtime


class TorchRuntime(Runtime):
    """Our from-scratch model in eager PyTorch on the CPU (or `device`)."""
    name = "torch"
    OPTIONS = ("checkpoint", "model", "device", "threads")
    needs_model = False

    def __init__(self, checkpoint=None, model=None, device: str = "cpu", threads: int | None = None):
        if checkpoint is None and model is None:
            raise UserError(f"runtime {self.name} runs our model, not an ONNX file: pass --checkpoint CKPT")
        self.checkpoint, self.model, self.device, self.threads = checkpoint, model, device, threads
        self.module = None

    @classmethod
    def availability(cls) -> Availability:
        try:
            import torch  # noqa: F401
        except ImportError:
            return Availability(False, "torch is not installed")
        return Availability(True)

    def _build(self):
        if self.model is not None:
            return copy.deepcopy(self.model)
        from lstm_export import checkpoint as ckpt_io
        return ckpt_io.load(self.checkpoint).build_model()

    def _prepare(self, source) -> None:
        import torch
        if self.threads:
            torch.set_num_threads(self.threads)
        self.module = self._build().eval().to(self.device)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in feeds.items()}
        state = (t["h_0"], t["c_0"]) if "h_0" in t else None
        with torch.inference_mode():
            if "tokens" in t:  # a char LM (the module may be wrapped, e.g. by torch.compile)
                y, (h, c) = self.module(t["tokens"], state)
                first = "logits"
            else:
                lengths = t["lengths"].cpu() if "lengths" in t else None
                y, (h, c) = self._call_lstm(t["input"], state, lengths)
                first = "output"
        return {first: y.cpu().numpy(), "h_n": h.cpu().numpy(), "c_n": c.cpu().numpy()}

    def _call_lstm(self, x, state, lengths):
        return self.module(x, state, lengths=lengths)

    def _release(self) -> None:
        self.module = None


class TorchNNRuntime(TorchRuntime):
    """torch.nn.LSTM (oneDNN on CPU, cuDNN on CUDA) loaded with our weights: the independent oracle."""

    name = "torch-nn"

    def _build(self):
        import torch

        from lstm_export.charlm import CharLM
        from lstm_export.model import LayerNormLSTM
        ours = super()._build()
        lstm = ours.lstm if isinstance(ours, CharLM) else ours
        if isinstance(lstm, LayerNormLSTM):
            raise UserError("torch-nn has no LayerNorm LSTM; compare a LayerNormLSTM with `torch` and onnx-reference")
        ref = torch.nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, bias=lstm.bias,
                            batch_first=lstm.batch_first, bidirectional=lstm.bidirectional)
        ref.load_state_dict(lstm.state_dict())
        if isinstance(ours, CharLM):
            ours.lstm = ref
            return ours
        return ref

    def _call_lstm(self, x, state, lengths):
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
        if lengths is None:
            return self.module(x, state)
        bf = self.module.batch_first
        ran = lengths > 0  # torch packs no empty sequence: those get ONNX's zeros without running
        if not bool(ran.any()):
            D = 2 if self.module.bidirectional else 1
            zeros = x.new_zeros(self.module.num_layers * D, x.shape[0 if bf else 1], self.module.hidden_size)
            return x.new_zeros(*x.shape[:2], D * self.module.hidden_size), (zeros, zeros.clone())
        keep = torch.nonzero(ran).flatten()
        sub = x.index_select(0 if bf else 1, keep)
        sub_state = tuple(s.index_select(1, keep) for s in state) if state is not None else None
        packed = pack_padded_sequence(sub, lengths[keep].long(), batch_first=bf, enforce_sorted=False)
        y_sub, (h_sub, c_sub) = self.module(packed, sub_state)
        y_sub, _ = pad_packed_sequence(y_sub, batch_first=bf, total_length=x.shape[1 if bf else 0])
        y = x.new_zeros(*x.shape[:2], y_sub.shape[-1]).index_copy(0 if bf else 1, keep, y_sub)
        h = h_sub.new_zeros(h_sub.shape[0], x.shape[0 if bf else 1], h_sub.shape[2]).index_copy(1, keep, h_sub)
        c = torch.zeros_like(h).index_copy(1, keep, c_sub)
        return y, (h, c)


class TorchCompileRuntime(TorchRuntime):
    """Our model through torch.compile (inductor); compiled on the first run, so time after warm-up."""

    name = "torch-compile"

    def _prepare(self, source) -> None:
        import torch
        super()._prepare(source)
        self.module = torch.compile(self.module, dynamic=False)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import warnings
        # Dynamo warns (UserWarning, once per site) while it traces our native kernel's calls on the
        # first run: advice for torch's developers, not the user's console
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._dynamo")
            return super()._run(feeds)
