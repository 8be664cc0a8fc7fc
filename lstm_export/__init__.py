"""lstm-export: train an LSTM, export it to ONNX, run and compile it everywhere, and prove they agree."""
from .errors import UserError
from .model import LSTM, LayerNormLSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "LayerNormLSTM", "UserError"]
__version__ = "0.1.0"
