"""TVM's C++ log (LOG(WARNING) and friends write to the process's stderr, file descriptor 2) sent to
the Python debug log for the duration of a block: a failed import's C++ warnings would otherwise be
the last lines a user sees, below the project's own one-line error.

File descriptor 2 belongs to the whole process, so the redirection is lock-protected: one block at a
time, and other threads' writes to stderr during it land in the debug log too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading

log = logging.getLogger("lstm_export.runtimes.tvm")
_LOCK = threading.RLock()


@contextlib.contextmanager
def native_stderr_to_log(what: str):
    """Within the block, native writes to fd 2 go to a temporary file, logged at debug level after."""
    with _LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no usable fd 2 (an embedded interpreter): nothing to redirect
            yield
            return
        with tempfile.TemporaryFile(mode="w+b") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode(errors="replace").strip()
                if text:
                    log.debug("%s, TVM's log:\n%s", what, text)
