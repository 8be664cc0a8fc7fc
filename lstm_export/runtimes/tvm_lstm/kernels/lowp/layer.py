"""The bf16 LSTM layer in a Relax graph: packed bf16 constants and a PrimFunc that calls the C kernel
(lowp_lstm.c) by call_extern. The converter (frontend/lstm.py) emits it for every LSTM direction with
constant weights when the import's LowpOptions say so."""
from __future__ import annotations

from dataclasses import dataclass, field

from tvm import relax
from tvm.script import tirx as T

from lstm_export.common.errors import UserError

from ..cpu_layer import DirectionIO
from ..marks import mark
from . import engine, pack


@dataclass
class LowpOptions:
    """One import's bf16 (or int8) settings: `amx` the target has AMX, `dot` AVX512-BF16, `int8`
    int8 weights may be chosen (compile --precision int8); `measure_s` seconds to time each
    layer's candidates (0: the derived rule); `cc` the C compiler for timing here; `layers`
    collects each layer's choice for meta.json."""

    amx: bool
    threads: int
    l2_bytes: int
    dot: bool = True
    int8: bool = False
    amx8: bool = False  # AMX-INT8 (TDPBUSD) for int8 layers
    measure_s: float = 0.0
    cc: str | None = None
    layers: list = field(default_factory=list)


def make_lowp_layer(I: int, H: int, flags: int, threads: int, has_state: bool, has_lens: bool, int8: bool = False):
    """PrimFunc(x (T, B, I), w, r (bf16 bits, or int8's bytes), bias, p, h0, c0, lens) -> y (T, B, H),
    hn, cn (B, H). Without has_state h0, c0 are (1, H) placeholders; without has_lens lens is (1,)."""
    kb = pack.K_BLOCK_INT8 if int8 else pack.K_BLOCK
    IK, HK, HP = (pack.ceil_to(n, m) for n, m in ((I, kb), (H, kb), (H, 16)))
    # bf16: 4 gates x HP units x K values of 2 bytes; int8: 1 byte each, then scales and sums (UB x 256 B each)
    W_SIZE, R_SIZE = ((K * 4 * HP + 2 * (HP // 16) * 256) if int8 else K * 4 * HP for K in (IK, HK))
    WT = "uint8" if int8 else "uint16"

    @T.prim_func(private=True)
    def lstm_layer_bf16(var_x: T.handle, w: T.Buffer((W_SIZE,), WT), r: T.Buffer((R_SIZE,), WT),
                        bias: T.Buffer((4 * HP,), "float32"), p: T.Buffer((3, HP), "float32"), var_h0: T.handle,
                        var_c0: T.handle, var_lens: T.handle, var_y: T.handle, var_hn: T.handle, var_cn: T.handle):
        n_t = T.int64()
        n_b = T.int64()
        x = T.match_buffer(var_x, (n_t, n_b, I), "float32")
        h0 = T.match_buffer(var_h0, (n_b if has_state else 1, H), "float32")
        c0 = T.match_buffer(var_c0, (n_b if has_state else 1, H), "float32")
        lens = T.match_buffer(var_lens, (n_b if has_lens else 1,), "int32")
        y = T.match_buffer(var_y, (n_t, n_b, H), "float32")
        hn = T.match_buffer(var_hn, (n_b, H), "float32")
        cn = T.match_buffer(var_cn, (n_b, H), "float32")
        rc = T.call_extern("int32", engine.SYMBOL, x.data, w.data, r.data, bias.data, p.data, h0.data, c0.data,
                           lens.data, y.data, hn.data, cn.data, n_t, n_b, T.int64(I), T.int64(H), T.int64(flags),
                           T.int64(threads))
        assert rc == 0, "the bf16 LSTM kernel could not allocate its scratch memory"
    # opaque to FuseOps: a body of one extern call reads to TVM's pattern analysis as fusible
    return lstm_layer_bf16.with_attr("op_pattern", 8)


def emit_lowp_direction(bb, X, spec, consts, io: DirectionIO, I: int, opts: LowpOptions):
    """One direction of an LSTM layer in bf16 -> (y, hn, cn). consts: this direction's w (4H, I),
    r (4H, H), bias (4H,) = Wb + Rb and p (3H,) or None, in ONNX order."""
    w, r, bias, p = consts
    n_t, n_b, has_state = io.n_t, io.n_b, io.has_state
    if spec.clip is not None or spec.input_forget or tuple(a[0].lower() for a in (spec.f, spec.g, spec.h)) != _DEFAULT:
        raise UserError(f"--precision {'int8' if opts.int8 else 'bf16'} computes LSTMs with the default activations "
                        "(Sigmoid, Tanh, Tanh), no clip and input_forget=0; this model's LSTM differs: compile it at "
                        "fp32 (the default)")
    H = spec.hidden
    layer = _choose(opts, _static(n_t), _static(n_b), I, H)
    flags = (layer.flags(opts.l2_bytes) | (engine.HAS_STATE if has_state else 0)
             | (engine.HAS_PEEP if p is not None else 0) | (engine.HAS_LENS if spec.has_lens else 0)
             | (engine.REVERSE if spec.reverse else 0))
    func = make_lowp_layer(I, H, flags, opts.threads, has_state, spec.has_lens, layer.int8)
    gvar = bb.add_func(mark(func), f"lstm_layer_bf16_{'rev' if spec.reverse else 'fwd'}")
    packed = [engine.packed(layer, w, H), engine.packed(layer, r, H), pack.pack_bias(bias, H),
              pack.pack_peepholes(p, H)]
    y, state = relax.TensorType([n_t, n_b, H], "float32"), relax.TensorType([n_b, H], "float32")
    out = bb.emit(relax.call_tir(gvar, [X, *(relax.const(c) for c in packed), io.h0, io.c0, io.lens],
                                 [y, state, state]))
    return tuple(bb.emit(relax.TupleGetItem(out, i)) for i in range(3))


_DEFAULT = ("sigmoid", "tanh", "tanh")


def _static(dim) -> int | None:
    value = getattr(dim, "value", None)
    return int(value) if value is not None else None


def _choose(opts: LowpOptions, t: int | None, b: int | None, I: int, H: int) -> engine.LowpLayer:
    """The derived layer, or the fastest candidate timed on (t, b) here; recorded in opts.layers."""
    base = engine.derived(t, b, I, H, opts.amx, opts.l2_bytes, opts.int8, opts.dot, opts.amx8)
    shape = (t, b, I, H)
    if opts.measure_s <= 0 or t is None or b is None or opts.cc is None:
        why = ("the derived rule, applied at each call (symbolic T or B)" if t is None or b is None else
               "the derived rule" + ("" if opts.measure_s > 0 else " (no timing budget, or not this machine)"))
        opts.layers.append(engine.record(base, why, {}, shape))
        return base
    done = next((e for e in opts.layers if e["shape_TBIH"] == list(shape) and e["timed_ms"]), None)
    if done is not None:  # the other direction, or a layer alike: timed once
        opts.layers.append({**done, "chosen_by": "as an identical layer above"})
        return engine.LowpLayer(done["engine"], done["mode"])
    cands = [base] + [c for c in engine.candidates(b, opts.amx, opts.int8, opts.dot, opts.amx8) if c != base]
    timed = engine.measure(engine.host_library(opts.cc), t, b, I, H, cands, opts.threads, opts.measure_s)
    layer = engine.choose(base, timed)
    opts.layers.append(engine.record(layer, "measured here", timed, shape))
    return layer


