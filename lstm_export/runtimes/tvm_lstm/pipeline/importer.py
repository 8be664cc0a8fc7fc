"""The import stage: an ONNX graph -> a Relax IRModule, through TVM's ONNX frontend with our
converters registered (frontend/registry.py), its failures turned into one line naming the node."""
from __future__ import annotations

import contextlib
import io
import re

from lstm_export.common.errors import UserError, first_line

from ..frontend.convert_options import DEFAULT, ConvertOptions


def import_onnx(model, options: ConvertOptions = DEFAULT):
    """Relax IRModule from an ONNX ModelProto, with our converters registered with `options` (the CPU
    kernels' plan, CUDA, reduced precision). TVM's own C++ log lines (warnings of a failed import)
    go to this module's debug log, not the console."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from ..frontend.registry import ConvertFailure, lstm_registered
    from ..target.native_log import native_stderr_to_log
    printed = io.StringIO()  # the frontend prints "Error converting operator X, ...": no console text
    failure = None
    with native_stderr_to_log("TVM import"):
        try:
            with lstm_registered(options), contextlib.redirect_stdout(printed):
                return from_onnx(model, keep_params_in_input=False)
        except tvm.error.OpNotImplemented as e:
            ops = str(e).split(":", 1)[-1].strip().splitlines()[0]
            failure = UserError(f"TVM cannot import this model: no converter for operator(s) {ops}")
        except UserError as e:
            failure = type(e)(str(e))
        except ConvertFailure as e:
            where = f"{e.op} node {e.node!r}" if e.node else f"a {e.op} node"
            failure = failure_for(model, f"TVM cannot import {where}: {first_line(e.cause, 200).rstrip('.')}")
        except Exception as e:  # one line: the op, the node, TVM's reason
            failure = _import_failure(model, first_line(e, 200))
        # the failed import's frames (and the BlockBuilder they hold, which warns when destroyed)
        # are freed here, while TVM's log still goes to the debug log
        import gc
        gc.collect()
    raise failure


def _import_failure(model, why: str) -> UserError:
    """One line naming the node a failure outside the converters (those are ConvertFailures) was on,
    and its reason: a SymbolicShapeError when the model has symbolic input dims (static shapes may
    cure it), else a UserError."""
    from ..frontend.simplify import all_nodes
    nodes_all = list(all_nodes(model.graph))  # If/Loop/Scan bodies too: exporters wrap whole models in If
    first = why.split(maxsplit=1)[0] if why else ""  # TVM's message may start with the op
    op = first if any(n.op_type == first for n in nodes_all) else None
    named = re.search(r"\bNode (\S+) ", why)  # TVM's "Node node_2 cannot handle ShapeExpr inputs"
    hit = [n for n in nodes_all if named and n.name == named.group(1)]
    if op is None and len(hit) == 1:
        op = hit[0].op_type
    nodes = [n.name or f"#{i}" for i, n in enumerate(nodes_all) if n.op_type == op and (not hit or n in hit)]
    where = (f"{op} node {nodes[0]!r}" if len(nodes) == 1 else
             f"one of the {op} nodes ({', '.join(map(repr, nodes[:4]))})" if nodes else "this model")
    return failure_for(model, f"TVM cannot import {where}: {why.rstrip('.')}")


def failure_for(model, text: str) -> UserError:
    """A failure of TVM's on `model`: a SymbolicShapeError when the model has symbolic input dims
    (static shapes may cure it: `run` and the CLI's hint act on that), else a UserError."""
    from lstm_export.common.errors import SymbolicShapeError

    from ...model_io import fixed_dim, input_specs
    symbolic = any(not fixed_dim(d) for s in input_specs(model) for d in s.shape)
    return SymbolicShapeError(text) if symbolic else UserError(
        f"{text}; run it with --runtime ort-cpu meanwhile, and report the model with this line")
