"""The compile cache: `--runtime tvm-llvm|tvm-cuda` on an .onnx compiles once per model and target.

An entry is a compiled folder (compile.compile_onnx's output) under
$XDG_CACHE_HOME/lstm-export/tvm/KEY, KEY a hash of everything the library depends on: the ONNX
bytes, the full target (for `llvm`: this CPU's triple, mcpu, features and cores), the CUDA arch, the
kernel plan (and the plan budget, where compile measures plans), TVM's, tvm-ffi's and our versions,
and the compiler's own source (so that a changed converter or kernel in a development install never
loads an entry it did not build). Invariants:
- an entry appears whole or not at all: compiled into a temporary folder beside it, then renamed;
- a hit is checked against the library's sha256 recorded at write time; a corrupted or truncated
  entry is removed and compiled again;
- the cache stays under its size cap (LSTM_EXPORT_CACHE_MB, default 2048): least recently used
  entries are evicted after each write.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from lstm_export.common import cbuild

from ...source import CompiledModel, ModelSource
from .options import CompileOptions, options_from
from .source_digest import compiler_digest  # noqa: F401 (tests patch it here: cache_key reads it here)

DEFAULT_CAP_MB = 2048


def cache_root() -> Path:
    return cbuild.cache_root("tvm")


def cache_key(source: ModelSource, opts: CompileOptions) -> str:
    """The entry's name: a hash of the model's bytes and everything the compiled library depends on
    (opts as cached_compile resolves them: the plan given or derived, and the plan budget where
    compile measures plans)."""
    import tvm

    from lstm_export import __version__

    from ..target.targets import parse_target
    try:
        from importlib.metadata import version
        ffi = version("apache-tvm-ffi")
    except Exception:  # not installed as a distribution (a source build): TVM's version covers it
        ffi = ""
    tgt = parse_target(opts.target, opts.threads, opts.arch)
    plan = opts.plan
    parts = {"onnx": source.digest, "target": str(tgt.export()), "arch": opts.arch if tgt.kind.name == "cuda" else "",
             "plan": {k: v for k, v in asdict(plan).items() if k != "info"} if plan is not None else None,
             "tvm": tvm.__version__, "tvm_ffi": ffi, "lstm_export": __version__, "compiler": compiler_digest()}
    if opts.plan_budget_s:  # the plan is measured from `plan` (the derived one) within this budget
        parts["plan_budget_s"] = opts.plan_budget_s
    if opts.input_shapes:  # a build specialised to these input shapes (absent: the key of a symbolic build)
        parts["input_shapes"] = {k: list(v) for k, v in sorted(opts.input_shapes.items())}
    if opts.input_values:
        parts["input_values"] = dict(sorted(opts.input_values.items()))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def resolved(opts: CompileOptions) -> CompileOptions:
    """The options an entry is keyed and compiled with: for llvm without a plan given, the plan
    derived on this machine (its caches are part of the key), measured from within the plan budget
    where the target is this machine, else taken as derived (budget 0)."""
    from ..kernels.cpu_plan import is_host, plan_for
    from ..target.targets import parse_target
    tgt = parse_target(opts.target, opts.threads, opts.arch)
    if opts.plan is not None or tgt.kind.name != "llvm":
        return opts.replace(plan_budget_s=0, progress=False)
    measure = opts.plan_budget_s if is_host(tgt) else 0
    return opts.replace(plan=plan_for(tgt), plan_budget_s=measure, progress=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _valid(folder: Path) -> CompiledModel | None:
    """The entry, if it is whole: meta.json readable and the library's bytes as recorded."""
    try:
        compiled = CompiledModel.open(folder)
        if compiled.meta.library_sha256 == _sha256(compiled.library):
            return compiled
    except Exception:  # unreadable, half-deleted or foreign: treated as absent and rewritten
        pass
    return None


def cached_compile(source: ModelSource, options: CompileOptions | None = None, root: Path | None = None,
                   cap_mb: float | None = None, **fields) -> tuple[CompiledModel, bool]:
    """The compiled model for `source` with `options` (or CompileOptions(**fields)), from the cache
    or compiled now. Returns (compiled, hit)."""
    from .compile import compile_onnx
    root = root or cache_root()
    opts = resolved(options_from(options, fields))
    key = cache_key(source, opts)
    entry = root / key
    if entry.exists():
        compiled = _valid(entry)
        if compiled is not None:
            os.utime(entry)  # least recently used is evicted first
            return compiled, True
        shutil.rmtree(entry, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        # a measured plan starts from the derived one, which compile derives itself
        compiled = compile_onnx(source, work, opts.replace(plan=None) if opts.plan_budget_s else opts)
        dataclasses.replace(compiled.meta, library_sha256=_sha256(compiled.library), cache_key=key).write(work)
        try:
            work.rename(entry)
        except OSError:  # another process wrote the same entry meanwhile: theirs is as good
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    evict(root, cap_mb, keep=entry)
    return _valid(entry) or CompiledModel.open(entry), False


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def evict(root: Path, cap_mb: float | None = None, keep: Path | None = None) -> list[Path]:
    """Removes least recently used entries until the cache is under its cap; returns them."""
    if cap_mb is None:
        try:
            cap_mb = float(os.environ.get("LSTM_EXPORT_CACHE_MB", DEFAULT_CAP_MB))
        except ValueError:
            cap_mb = DEFAULT_CAP_MB
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
    sizes = {p: _size(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for p in entries:
        if total <= cap_mb * 2**20:
            break
        if keep is not None and p == keep:
            continue
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
        removed.append(p)
    return removed
