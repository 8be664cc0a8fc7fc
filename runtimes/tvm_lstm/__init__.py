"""TVM as an LSTM compiler: a Relax converter for ONNX LSTM and the compile step (imports tvm)."""
import inspect as _inspect
import sys as _sys


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
