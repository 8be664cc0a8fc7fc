"""ONNX files and feeds: loading with clear errors, input specs, feed checks and random inputs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_export.common.errors import UserError, first_line

_ONNX_TO_NP = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
               9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype, and dims (int, or str for a symbolic dim)."""

    name: str
    dtype: np.dtype
    shape: tuple

    def describe(self) -> str:
        return f"{self.name}: {np.dtype(self.dtype).name}[{', '.join(map(str, self.shape))}]"


def load_onnx(path: str | Path):
    """Reads and checks an ONNX file; a missing, non-ONNX or truncated file raises UserError."""
    import onnx
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist; export one with `lstm-export export`")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise UserError(f"{path} is not a valid ONNX model ({first_line(e, 160)}); re-export it or check the "
                        "file") from None
    return model


def onnx_dtype_name(elem_type: int) -> str:
    import onnx
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def _specs(values, initializers=()) -> list[TensorSpec]:
    skip = set(initializers)
    out = []
    for v in values:
        if v.name in skip:
            continue
        tt = v.type.tensor_type
        if not v.type.HasField("tensor_type") or tt.elem_type not in _ONNX_TO_NP:
            kind = v.type.WhichOneof("value") or "unknown"
            what = onnx_dtype_name(tt.elem_type) if kind == "tensor_type" else kind
            raise UserError(f"{v.name!r} is a {what} value; lstm-export runs models whose inputs and outputs are "
                            f"numeric tensors ({', '.join(sorted({np.dtype(t).name for t in _ONNX_TO_NP.values()}))})")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        out.append(TensorSpec(v.name, np.dtype(_ONNX_TO_NP.get(tt.elem_type, np.float32)), dims))
    return out


def fixed_dim(d) -> bool:
    """Whether a declared dim is a size (not a name, '?' or an exporter's -1)."""
    return isinstance(d, int) and d > 0


def input_specs(model) -> list[TensorSpec]:
    return _specs(model.graph.input, [i.name for i in model.graph.initializer])


def output_specs(model) -> list[TensorSpec]:
    return _specs(model.graph.output)


def metadata(model) -> dict:
    """metadata_props as a dict; lstm_export.config parsed from JSON when present."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "lstm_export.config" in meta:
        meta["lstm_export.config"] = json.loads(meta["lstm_export.config"])
    return meta


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray], bounds: dict[str, int] | None = None,
                allow_nonfinite: bool = False, lengths: dict[str, list] | None = None,
                widths: dict[str, list] | None = None) -> None:
    """The runtime contract's feed check, once per run; raises UserError naming the first problem.

    Names, dtypes, ranks, fixed and symbolic dims against the graph's declared inputs; no empty
    dimension (an empty batch or zero time steps has nothing to compute, and runtimes disagree on
    what to return: ORT aborts the process, OpenVINO returns uninitialised memory); index inputs
    within their table (`bounds`: out of range, TVM reads past the table or crashes); no NaN or Inf
    unless `allow_nonfinite` (runtimes disagree on what NaN state gives: some NaN, some finite);
    sequence lengths (`lengths`: input -> [the X input it measures, its time axis]) in [0, T], as the
    ONNX spec and ORT allow (a 0 gives zeros and a zero final state; ORT refuses lengths past T,
    which TVM and OpenVINO ran; OpenVINO gets a zero length wrong, which compare reports); an
    undeclared input width that a recurrent node's W fixes (`widths`: input -> [axis, width, node])
    at that width.
    """
    names = [s.name for s in specs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise UserError(f"inputs missing: {', '.join(missing)}; the model expects "
                        + "; ".join(s.describe() for s in specs))
    extra = [n for n in feeds if n not in names]
    if extra:
        raise UserError(f"unexpected inputs: {', '.join(extra)}; the model's inputs are {', '.join(names)}")
    bound: dict[str, tuple[int, str]] = {}
    for s in specs:
        a = feeds[s.name]
        if not isinstance(a, np.ndarray):
            raise UserError(f"input {s.name} is a {type(a).__name__}, expected a numpy array")
        if a.dtype != s.dtype:
            raise UserError(f"input {s.name} has dtype {a.dtype}, expected {np.dtype(s.dtype).name}")
        if a.ndim != len(s.shape):
            raise UserError(f"input {s.name} has rank {a.ndim} (shape {list(a.shape)}), expected rank "
                            f"{len(s.shape)} {list(s.shape)}")
        for axis, (got, want) in enumerate(zip(a.shape, s.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise UserError(f"input {s.name} has dimension {axis} = {got}, expected {want} "
                                f"(shape {list(s.shape)})")
            if isinstance(want, str) and want != "?":
                if want in bound and bound[want][0] != got:
                    raise UserError(f"dimension {want!r} is {bound[want][0]} in {bound[want][1]} but {got} in {s.name}")
                bound.setdefault(want, (got, s.name))
        if s.name in (widths or {}):
            axis, width, node = widths[s.name]
            if a.shape[axis] != width:
                raise UserError(f"input {s.name} has width {a.shape[axis]} (dimension {axis}, shape {list(a.shape)}), "
                                f"but the {node} that reads it has W for width {width}; feed {s.name} with "
                                f"{width} features")
        if a.size == 0:
            raise UserError(f"input {s.name} is empty (shape {list(a.shape)}); every dimension needs at least 1 "
                            "(an empty batch or zero time steps has nothing to run)")
        if np.issubdtype(a.dtype, np.floating) and not allow_nonfinite and not np.isfinite(a).all():
            raise UserError(f"input {s.name} holds {int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} Inf "
                            "values; fix the input, or pass --allow-nonfinite (allow_nonfinite=True) to run it")
        if s.name in (lengths or {}):
            x_name, axis = lengths[s.name]
            t = feeds[x_name].shape[axis] if x_name in feeds and feeds[x_name].ndim > axis else None
            t = t if t is not None else bound.get("time", (None,))[0]
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or (t is not None and hi > t):
                raise UserError(f"input {s.name} holds sequence lengths {lo}..{hi}, outside [0, {t if t else 'T'}]"
                                f"{f' (the {t} time steps given)' if t else ''}; a sequence has 0 to T steps")
        n = (bounds or {}).get(s.name)
        if n is not None and np.issubdtype(a.dtype, np.integer):
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= n:
                raise UserError(f"input {s.name} holds ids {lo}..{hi}, outside [0, {n}) (the {n} rows of the "
                                "table it indexes); check the vocabulary the ids came from")


def load_feeds(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"inputs file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{path} is not a readable .npz file ({type(e).__name__}); write it with numpy.savez") from None


def save_outputs(path: str | Path, outputs: dict[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **outputs)
    tmp.replace(path)


def bind_shapes(specs: list[TensorSpec], shapes: dict[str, tuple[int, ...]],
                dims: dict[str, int] | None = None) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Every input's static shape from `shapes` (by input) and `dims` (by symbolic dim name), and the
    symbolic dims they bind. Raises UserError naming the input on an unknown name, a wrong rank, a
    dim that contradicts the model's fixed one, or a symbolic dim bound to two sizes."""
    known = {s.name: s for s in specs}
    unknown = [n for n in shapes if n not in known]
    if unknown:
        raise UserError(f"--input-shape names {', '.join(unknown)}, which the model has no input called; "
                        f"its inputs are {'; '.join(s.describe() for s in specs)}")
    bound = dict(dims or {})
    for name, shape in shapes.items():
        s = known[name]
        if len(shape) != len(s.shape):
            raise UserError(f"--input-shape {name}={'x'.join(map(str, shape))} has {len(shape)} dims; "
                            f"{s.describe()} has {len(s.shape)}")
        for want, got in zip(s.shape, shape):
            if isinstance(want, int) and want > 0 and want != got:
                raise UserError(f"--input-shape {name}={'x'.join(map(str, shape))} contradicts {s.describe()}")
            if isinstance(want, str) and want != "?":
                if bound.setdefault(want, got) != got:
                    raise UserError(f"dimension {want!r} is {bound[want]} elsewhere but {got} in --input-shape {name}")
    static = {}
    for s in specs:
        if s.name in shapes:
            static[s.name] = tuple(shapes[s.name])
        elif all((isinstance(d, int) and d > 0) or d in bound for d in s.shape):
            static[s.name] = tuple(d if isinstance(d, int) and d > 0 else bound[d] for d in s.shape)
    return static, bound


RNN_OPS = {"LSTM": 4, "GRU": 4, "RNN": 4}  # op -> the position of its sequence_lens input


def length_inputs(model) -> dict[str, list]:
    """Graph inputs used as an RNN node's sequence_lens -> [its X when X is a graph input (else ""),
    X's time axis]. Without X among the inputs, T comes from a dim named 'time'."""
    graph_inputs = {i.name for i in model.graph.input}
    out = {}
    for node in model.graph.node:
        k = RNN_OPS.get(node.op_type)
        if k is not None and len(node.input) > k and node.input[k] in graph_inputs:
            layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
            out[node.input[k]] = [node.input[0] if node.input[0] in graph_inputs else "", 1 if layout else 0]
    return out


def input_widths(model) -> dict[str, list]:
    """Graph inputs used as a recurrent node's X whose last dimension is not declared (symbolic or an
    exporter's -1) while the node's W is a constant -> [that axis, the width W needs, the node]: the
    width is known all the same, and a feed of another width is refused in one line."""
    inits = {i.name: i for i in model.graph.initializer}
    specs = {s.name: s for s in input_specs(model)}
    out = {}
    for node in model.graph.node:
        if node.op_type not in RNN_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        x, w = specs.get(node.input[0]), inits[node.input[1]]
        if x is not None and len(x.shape) == 3 and len(w.dims) == 3 and not fixed_dim(x.shape[2]):
            out[x.name] = [2, int(w.dims[2]), f"{node.op_type} node {node.name!r}"]
    return out


def index_bounds(model) -> dict[str, int]:
    """Graph inputs used as a Gather's or GatherElements' indices over a constant table -> the table's
    size on that axis. (GatherND's coordinates each have their own bound: the artifact checks them.)"""
    inits = {i.name: i for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    out = {}
    for node in model.graph.node:
        if (
            node.op_type in ("Gather", "GatherElements")
            and len(node.input) > 1
            and node.input[0] in inits
            and node.input[1] in graph_inputs
        ):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = inits[node.input[0]].dims
            out[node.input[1]] = min(int(dims[axis]), out.get(node.input[1], 1 << 62))
    return out


MAX_RANDOM_BYTES = 1 << 31  # random inputs larger than this are surely a typo in --dim


def random_feeds(model, seed: int = 0, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes: normal floats, valid indices, lengths in [1, time].
    `model`: an ONNX proto or a source.ModelSource."""
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    if hasattr(model, "index_bounds"):  # a ModelSource (maybe a compiled folder with no proto)
        specs, bounds, widths = model.inputs, model.index_bounds, model.input_widths
    else:
        specs, bounds, widths = input_specs(model), index_bounds(model), input_widths(model)
    defaults = {"batch": 2, "time": 8}
    feeds = {}
    for s in specs:
        shape = []
        for axis, d in enumerate(s.shape):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif s.name in widths and widths[s.name][0] == axis:  # what the node's W reads
                shape.append(widths[s.name][1])
            elif d in dims:
                shape.append(dims[d])
            elif d in defaults:
                shape.append(dims.setdefault(d, defaults[d]))
            else:
                raise UserError(f"input {s.name} has symbolic dimension {d!r}; give it a size with --dim {d}=N")
        if int(np.prod(shape, dtype=object)) * np.dtype(s.dtype).itemsize > MAX_RANDOM_BYTES:
            raise UserError(f"input {s.name} of shape {shape} would take more than {MAX_RANDOM_BYTES >> 30} GiB; "
                            "choose smaller --dim sizes")
        if np.issubdtype(s.dtype, np.floating):
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        elif s.name in ("lengths", "sequence_lens"):
            t_max = dims.get("time") or max((x for sp in specs for x in sp.shape if isinstance(x, int)), default=1)
            feeds[s.name] = rng.integers(1, t_max + 1, size=shape).astype(s.dtype)
        else:
            high = bounds.get(s.name, 2)
            feeds[s.name] = rng.integers(0, high, size=shape).astype(s.dtype)
    return feeds
