"""A model source: what every command and runtime takes. An .onnx file, or a folder written by
`lstm-export compile` (DIR/model.so + DIR/meta.json, and the ONNX it was compiled from as
DIR/model.onnx). It is read and checked once; runtimes take it from there and never re-read it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from lstm_export.common.errors import UserError

from .model_io import (
    TensorSpec,
    check_feeds,
    index_bounds,
    input_specs,
    input_widths,
    length_inputs,
    load_onnx,
    metadata,
    output_specs,
)

SOURCE_ONNX = "model.onnx"  # the copy of its ONNX model a compiled folder keeps


META_JSON = "meta.json"


@dataclass(frozen=True)
class ArtifactMeta:
    """meta.json: what a compiled folder holds and what it was compiled for. `compile` writes it
    through `write` and every reader takes it through `read`, so a key is spelled in one place.
    Fields a target or precision does not have stay None and are not written."""

    inputs: list[dict]  # {"name", "dtype", "shape"}: the main's arguments, in order
    outputs: list[dict]
    target: str
    target_kind: str  # "llvm" or "cuda"
    tvm_version: str
    library: str = "model.so"  # or model.tar: the objects of a cross-compile without a linker here
    source: str = ""
    onnx_sha256: str = ""
    index_bounds: dict = field(default_factory=dict)
    length_inputs: dict = field(default_factory=dict)
    input_widths: dict = field(default_factory=dict)  # X input -> [axis, width, node] (model_io.input_widths)
    dims: dict = field(default_factory=dict)  # --dim
    input_shapes: dict = field(default_factory=dict)  # --input-shape: the only shapes it takes
    input_values: dict = field(default_factory=dict)  # --input-value: folded in, no longer inputs
    compile_s: float = 0.0
    tuning_db: str | None = None
    kernels_from_db: int = 0
    owned_outputs: list = field(default_factory=list)  # per output: a call may keep it without a copy
    precision: str = "fp32"  # compile --precision
    lowp_layers: list | None = None  # bf16/int8: each LSTM layer's engine (lowp.engine.layer_record)
    num_cores: int | None = None  # llvm: the threads the kernels are laid out for
    cpu: str | None = None
    kernel_plan: dict | None = None
    plan_selection: dict | None = None  # plan_select.PlanChoice
    cross_compiled: bool | None = None
    arch: str | None = None
    tuning: dict | None = None  # compile --tune: what it measured
    library_sha256: str | None = None  # set by the compile cache for the entries it keeps
    cache_key: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=1) + "\n"

    def write(self, folder: Path) -> None:
        """Written last and whole (a folder with meta.json is complete)."""
        tmp = folder / f".{META_JSON}.tmp"
        tmp.write_text(self.to_json())
        tmp.replace(folder / META_JSON)

    @classmethod
    def from_dict(cls, d: dict) -> ArtifactMeta:
        d = dict(d)
        if "bf16_layers" in d:  # folders compiled before reduced precision was named lowp
            d.setdefault("lowp_layers", d.pop("bf16_layers"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})  # keys of a newer release: ignored

    @classmethod
    def read(cls, folder: Path) -> ArtifactMeta:
        return cls.from_dict(json.loads((folder / META_JSON).read_text()))


@dataclass(frozen=True)
class CompiledModel:
    """What `compile` wrote: the folder, its library (model.so, or model.tar when cross-compiled
    without a linker) and meta.json's contents."""

    folder: Path
    library: Path
    meta: ArtifactMeta

    @classmethod
    def open(cls, folder: str | Path) -> CompiledModel:
        folder = Path(folder)
        try:
            meta = ArtifactMeta.read(folder)
            library = folder / meta.library
        except (OSError, ValueError, AttributeError, TypeError) as e:
            raise UserError(f"{folder} is not a compiled model (meta.json: {type(e).__name__}); "
                            f"make one with `lstm-export compile MODEL.onnx --out {folder}`") from None
        if not library.is_file():
            raise UserError(f"{folder} holds no {library.name}; recompile with "
                            f"`lstm-export compile MODEL.onnx --out {folder} --force`")
        return cls(folder, library, meta)


@dataclass(frozen=True)
class ModelSource:
    """One model, read once: its declared inputs and outputs, its ONNX proto when there is one,
    its compiled library when it is a compiled folder, and bounds on index inputs."""

    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    proto: object | None = None  # onnx.ModelProto
    onnx_path: Path | None = None
    compiled: CompiledModel | None = None
    digest: str = ""  # sha256 of the ONNX bytes: the compile cache's key
    index_bounds: dict[str, int] = field(default_factory=dict)  # index input -> rows of its table
    length_inputs: dict[str, list] = field(default_factory=dict)  # sequence_lens input -> [X input, time axis]
    input_widths: dict[str, list] = field(default_factory=dict)  # X input -> [axis, width W needs, node]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_feeds(self, feeds: dict[str, np.ndarray], allow_nonfinite: bool = False) -> None:
        """The runtime contract's feed check against this model (model_io.check_feeds)."""
        check_feeds(self.inputs, feeds, self.index_bounds, allow_nonfinite, self.length_inputs, self.input_widths)

    def metadata(self) -> dict:
        return metadata(self.proto) if self.proto is not None else {}

    def onnx(self):
        """The ONNX proto, for runtimes that run ONNX; a compiled folder without one is refused."""
        if self.proto is None:
            raise UserError(f"{self.path} keeps no {SOURCE_ONNX}, so only tvm runtimes can run it; "
                            "pass the .onnx file, or recompile with `lstm-export compile --force`")
        return self.proto


def open_model(path: str | Path | ModelSource) -> ModelSource:
    """Reads an .onnx file or a compiled folder once; a missing or broken one raises UserError."""
    if isinstance(path, ModelSource):
        return path
    path = Path(path)
    if path.is_dir():
        compiled = CompiledModel.open(path)
        onnx_path = path / SOURCE_ONNX
        if onnx_path.is_file():
            return _from_onnx(path, onnx_path, compiled)
        meta = compiled.meta
        specs = [[TensorSpec(s["name"], np.dtype(s["dtype"]), tuple(s["shape"])) for s in group]
                 for group in (meta.inputs, meta.outputs)]
        return ModelSource(path, *specs, compiled=compiled, digest=meta.onnx_sha256,
                           index_bounds=meta.index_bounds, length_inputs=meta.length_inputs,
                           input_widths=meta.input_widths)
    return _from_onnx(path, path, None)


def _from_onnx(path: Path, onnx_path: Path, compiled: CompiledModel | None) -> ModelSource:
    proto = load_onnx(onnx_path)
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    inputs = input_specs(proto)
    if compiled is not None and compiled.meta.input_shapes:  # compiled for static shapes: those only
        fixed = compiled.meta.input_shapes
        inputs = [TensorSpec(s.name, s.dtype, tuple(fixed[s.name])) if s.name in fixed else s for s in inputs]
    return ModelSource(path, inputs, output_specs(proto), proto, onnx_path, compiled, digest,
                       index_bounds(proto), length_inputs(proto), input_widths(proto))
