"""ONNX export of the LSTM family and the char LM: `unrolled`, `native` and `streaming` graphs.

Graphs are written by us node by node (not traced), so every file has the same clean shape:
meaningful input/output names, no shape-computation chains, the model config in metadata_props.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from lstm_export.common.errors import UserError

from .graph import GraphBuilder
from .layers import native_stack, unrolled_stack

MODES = ("unrolled", "native", "streaming")
DEFAULT_OPSET = 17
MIN_OPSET = {"unrolled": 13, "native": 14, "streaming": 14}
MAX_OPSET = 23


def _classify(model):
    """(lstm module, char LM or None)."""
    from ..charlm import CharLM
    from ..model import LSTM
    if isinstance(model, CharLM):
        return model.lstm, model
    if isinstance(model, LSTM):
        return model, None
    raise UserError(f"cannot export {type(model).__name__}: pass an lstm_export LSTM, LayerNormLSTM or CharLM")


def model_metadata(model, mode: str) -> dict[str, str]:
    """What metadata_props carry: the config (and vocabulary) needed to rebuild and check the model."""
    lstm, lm = _classify(model)
    cfg = {"kind": "char_lm" if lm is not None else type(lstm).__name__, "mode": mode,
           "input_size": lstm.input_size, "hidden_size": lstm.hidden_size, "num_layers": lstm.num_layers,
           "bidirectional": lstm.bidirectional, "batch_first": lstm.batch_first, "bias": lstm.bias}
    if hasattr(lstm, "eps"):
        cfg.update(eps=lstm.eps, forget_bias=lstm.forget_bias)
    meta = {"lstm_export.config": json.dumps(cfg)}
    if lm is not None:
        meta["lstm_export.model_config"] = json.dumps(vars(lm.cfg))
        if lm.vocab is not None:
            meta["lstm_export.vocab"] = lm.vocab.chars
    from .. import __version__
    meta["lstm_export.version"] = __version__
    return meta


def build_onnx(model, mode: str, seq_len: int | None = None, batch_size: int | None = None,
               opset: int | None = None, initial_state: bool = False, lengths: bool = False) -> onnx.ModelProto:
    """Builds the ONNX model in memory; see `export_onnx` for the arguments."""
    if mode not in MODES:
        raise UserError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not MIN_OPSET[mode] <= opset <= MAX_OPSET:
        raise UserError(f"opset {opset} is not supported for mode {mode!r}; use {MIN_OPSET[mode]}..{MAX_OPSET}")
    lstm, lm = _classify(model)
    layernorm = hasattr(lstm, "ln_gates_weight_l0")
    if layernorm and mode != "unrolled":
        raise UserError("a LayerNormLSTM has no native ONNX LSTM op; export it with mode='unrolled'")
    if layernorm and opset < 17:
        raise UserError(f"a LayerNormLSTM needs LayerNormalization (opset 17); got opset {opset}")
    if mode == "unrolled":
        if not seq_len:
            raise UserError("mode 'unrolled' traces a fixed sequence length; pass seq_len (--seq-len)")
        if lengths:
            raise UserError("variable lengths need the native LSTM op; use mode='native' for lengths")
    if mode == "streaming":
        if lstm.bidirectional:
            raise UserError("streaming needs a unidirectional LSTM: a reverse pass cannot see future chunks")
        initial_state = True
    if seq_len is not None and seq_len < 1 or batch_size is not None and batch_size < 1:
        raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")

    g = GraphBuilder(opset)
    T = seq_len if (seq_len and mode == "unrolled") else (seq_len or "time")
    Bd = batch_size or "batch"
    L, D, H = lstm.num_layers, lstm.num_directions, lstm.hidden_size
    state_shape = [L * D, Bd, H]
    if lm is not None:  # Gather (embedding) -> LSTM stack -> MatMul/Add (logits); tokens are (B, T)
        tokens = g.input("tokens", "int64", [Bd, T])
        emb = g.op("Gather", [g.const("embedding", lm.embed.weight.detach().numpy()), tokens], name="embedded")
        x = g.op("Transpose", [emb], name="embedded_tbi", perm=[1, 0, 2])  # (T, B, E)
        batch_first = True
    else:
        batch_first = lstm.batch_first
        shape = [Bd, T, lstm.input_size] if batch_first else [T, Bd, lstm.input_size]
        x = g.input("input", "float32", shape)
        if batch_first:
            x = g.op("Transpose", [x], name="input_tbi", perm=[1, 0, 2])
    h0 = g.input("h_0", "float32", state_shape) if initial_state else None
    c0 = g.input("c_0", "float32", state_shape) if initial_state else None
    seq = g.input("lengths", "int32", [Bd]) if lengths else None

    if mode == "unrolled":
        y, h_n, c_n = unrolled_stack(g, lstm, x, T, h0, c0)
    else:
        y, h_n, c_n = native_stack(g, lstm, x, h0, c0, seq)

    if lm is not None:
        y = g.op("Transpose", [y], name="hidden_bth", perm=[1, 0, 2])  # (B, T, H)
        logits = g.op("MatMul", [y, g.const("head_weight_T", lm.head.weight.detach().numpy().T)], name="logits_nobias")
        logits = g.op("Add", [logits, g.const("head_bias", lm.head.bias.detach().numpy())], name="logits_pre")
        g.output(logits, "logits", "float32", [Bd, T, lm.cfg.vocab_size])
    else:
        if batch_first:
            y = g.op("Transpose", [y], name="output_btd", perm=[1, 0, 2])
        g.output(y, "output", "float32", [Bd, T, D * H] if batch_first else [T, Bd, D * H])
    g.output(h_n, "h_n", "float32", state_shape)
    g.output(c_n, "c_n", "float32", state_shape)
    return g.model(f"lstm_export_{mode}", model_metadata(model, mode))


def export_onnx(model, path, mode: str, seq_len: int | None = None, batch_size: int | None = None,
                opset: int | None = None, initial_state: bool = False, lengths: bool = False) -> Path:
    """Exports an LSTM, LayerNormLSTM or CharLM to an ONNX file and checks it.

    Args:
        model: `lstm_export.LSTM`, `LayerNormLSTM` (unrolled only) or `CharLM`.
        path: the .onnx file to write.
        mode: "unrolled" (fixed `seq_len`, plain ops), "native" (one ONNX LSTM node per layer,
            dynamic batch and time axes) or "streaming" (native with (h, c) in and out).
        seq_len: time steps; required for unrolled, fixes the time axis otherwise.
        batch_size: fixes the batch axis (default: symbolic "batch").
        opset: ONNX opset (default 17; native needs >= 14).
        initial_state: add inputs h_0, c_0 of shape (layers*directions, batch, hidden).
        lengths: add an int32 input `lengths` (batch,) wired to the LSTM's sequence_lens (native).

    Returns:
        The path written. The file passes `onnx.checker.check_model(full_check=True)`.
    """
    proto = build_onnx(model, mode, seq_len, batch_size, opset, initial_state, lengths)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, tmp)
    tmp.replace(path)
    return path
