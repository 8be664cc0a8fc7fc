"""TVM as a compiler of recurrent ONNX models, in four stage folders that import downward only:
target/ (targets, the thread pool, TVM's log) < kernels/ (the TIR and C kernels) < frontend/ (the
ONNX converters) < pipeline/ (compile's stages, plan selection, tuning, the caches).

Code outside this folder takes the names below from here, never from a stage folder (a layout test
holds it): they are the compiler's public face, each looked up in its module on first use, so that
taking one name does not import every stage.
"""
import functools as _functools
import importlib as _importlib
import inspect as _inspect
import sys as _sys

_PUBLIC = {
    "compile_onnx": "pipeline.compile", "CompileOptions": "pipeline.options", "cached_compile": "pipeline.cache",
    "import_onnx": "pipeline.importer", "PlanChoice": "pipeline.plan_select", "shape_hint": "pipeline.shape_hint",
    "ConvertOptions": "frontend.convert_options",
    "cpu_info": "kernels.cpu_plan", "plan_for": "kernels.cpu_plan", "isa_of": "kernels.cpu_plan",
    "lowp_features": "kernels.lowp.engine:features", "has_vnni": "kernels.lowp.engine",
    "parse_target": "target.targets", "host_target": "target.targets", "cpu_flags": "target.targets",
    "machine_arch": "target.targets", "usable_cores": "target.targets",
    "pool_threads": "target.thread_pool", "one_task": "target.thread_pool", "share_cores": "target.thread_pool",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = _PUBLIC[name].partition(":")
    value = getattr(_importlib.import_module(f"{__name__}.{module}"), attr or name)
    globals()[name] = value
    return value


def _remember_frames_outside_modules(frame) -> None:
    """TVMScript runs inspect.stack() at every @T.prim_func and every T.macro call, and inspect looks
    up the source of each frame on the stack. A frame whose file belongs to no module (code the parser
    compiles, "<ast>"; the import machinery; runpy's or pytest-xdist's entry code below everything)
    misses inspect's file -> module cache, so each lookup scans all of sys.modules (about 2000 with
    torch and onnx loaded). Recording those files as belonging to no module gives the answer the scan
    gives, once. Measured: building an LSTM layer 0.95 s instead of 2.2 s (2.4 s under xdist), and
    MetaSchedule's import of tvm.s_tir.tensor_intrin 4 s instead of 27 s; the TVMScript is the same."""
    names = {"<ast>", "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"}
    while frame is not None:
        names.add(frame.f_code.co_filename)
        frame = frame.f_back
    for name in names:
        if name not in _inspect.modulesbyfile and _inspect.getmodule(None, name) is None:
            _inspect.modulesbyfile[name] = name  # a name no module has: getmodule returns None


_remember_frames_outside_modules(_sys._getframe(1))


def _find_parser_def(self):
    """ScriptMacro._find_parser_def without inspect.getouterframes: the same walk outward from the
    caller for the first frame whose globals hold the parser, but getouterframes also reads the
    source lines of every frame on the stack, which the search never looks at. At every T.macro
    call: 64 calls, 0.62 s of a 1.56 s parse of an LSTM layer's kernel."""
    name = self.parser_object_name
    frame = _sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{name} not available")


@_functools.lru_cache(maxsize=512)
def _macro_ast(source: str):
    from tvm.script.parser.core import doc
    return doc.parse(source)


def _as_ast(self):
    """Source.as_ast, parsed once per source text: each T.macro call parses its macro's source again
    (65 times, 0.38 s, for an LSTM layer), and the kernels define their macros anew at every build.
    The parser reads the doc tree and builds new IR from it; it never writes to the tree."""
    return _macro_ast(self.source)


def _patch_parser() -> None:
    try:
        from tvm.script.parser.core.diagnostics import Source
        from tvm.script.parser.core.parser import ScriptMacro
    except ImportError:  # another TVM layout: its own code stays
        return
    if hasattr(ScriptMacro, "_find_parser_def"):
        ScriptMacro._find_parser_def = _find_parser_def
    if hasattr(Source, "as_ast"):
        Source.as_ast = _as_ast


_patch_parser()
