"""lstm-export: train an LSTM, export it to ONNX, run and compile it everywhere, and prove they agree."""
from common.errors import UserError

from .export import export_onnx
from .model import LSTM, LayerNormLSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "LayerNormLSTM", "UserError", "export_onnx"]
__version__ = "0.1.0"
