"""lstm-export: train an LSTM, export it to ONNX, run and compile it everywhere, and prove they agree.

Every part installs under this one name, one floor per subpackage, imports pointing down only
(tests/test_layout.py holds it): `lstm_export.common` < the producer (the modules directly here: model,
reference, data, training, `lstm_export.export`) < `lstm_export.runtimes` < `lstm_export.harness` and
`lstm_export.serving` < `lstm_export.cli`. See docs/architecture.md.

The producer's public names are loaded on first use, so that `import lstm_export.runtimes...` (a
server, a deployed artifact's loader) does not import torch.
"""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["LSTM", "LSTMCell", "LayerNormLSTM", "UserError", "export_onnx"]

_LAZY = {"LSTM": ".model", "LSTMCell": ".model", "LayerNormLSTM": ".model", "export_onnx": ".export",
         "UserError": ".common.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
