"""A model source: what every command and runtime takes. An .onnx file, or a folder written by
`lstm-export compile` (DIR/model.so + DIR/meta.json, and the ONNX it was compiled from as
DIR/model.onnx). It is read and checked once; runtimes take it from there and never re-read it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lstm_export.common.errors import UserError

from .model_io import (
    TensorSpec,
    check_feeds,
    index_bounds,
    input_specs,
    length_inputs,
    load_onnx,
    metadata,
    output_specs,
)

SOURCE_ONNX = "model.onnx"  # the copy of its ONNX model a compiled folder keeps


@dataclass(frozen=True)
class CompiledModel:
    """What `compile` wrote: the folder, its library (model.so, or model.tar when cross-compiled
    without a linker) and meta.json's contents."""

    folder: Path
    library: Path
    meta: dict

    @classmethod
    def open(cls, folder: str | Path) -> CompiledModel:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            library = folder / meta.get("library", "model.so")
        except (OSError, ValueError, AttributeError) as e:
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

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_feeds(self, feeds: dict[str, np.ndarray], allow_nonfinite: bool = False) -> None:
        """The runtime contract's feed check against this model (model_io.check_feeds)."""
        check_feeds(self.inputs, feeds, self.index_bounds, allow_nonfinite, self.length_inputs)

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
        specs = [[TensorSpec(s["name"], np.dtype(s["dtype"]), tuple(s["shape"])) for s in compiled.meta[k]]
                 for k in ("inputs", "outputs")]
        return ModelSource(path, *specs, compiled=compiled, digest=compiled.meta.get("onnx_sha256", ""),
                           index_bounds=compiled.meta.get("index_bounds", {}),
                           length_inputs=compiled.meta.get("length_inputs", {}))
    return _from_onnx(path, path, None)


def _from_onnx(path: Path, onnx_path: Path, compiled: CompiledModel | None) -> ModelSource:
    proto = load_onnx(onnx_path)
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    inputs = input_specs(proto)
    if compiled is not None and compiled.meta.get("input_shapes"):  # compiled for static shapes: those only
        fixed = compiled.meta["input_shapes"]
        inputs = [TensorSpec(s.name, s.dtype, tuple(fixed[s.name])) if s.name in fixed else s for s in inputs]
    return ModelSource(path, inputs, output_specs(proto), proto, onnx_path, compiled, digest,
                       index_bounds(proto), length_inputs(proto))
