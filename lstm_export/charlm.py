"""Character language model: embedding -> LSTM (or LayerNormLSTM) -> linear head."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lstm_export.common.errors import UserError

from .config import ModelConfig
from .model import LSTM, LayerNormLSTM


def sample_id(logits, temperature: float, rng: np.random.Generator) -> int:
    """One id drawn from softmax(logits / temperature); temperature 0 takes the most likely one.
    The one sampler: `train.sample` and the server's /v1/generate both draw with it."""
    z = np.asarray(logits, np.float64)  # (V,)
    if temperature == 0:
        return int(z.argmax())
    p = np.exp((z - z.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


class CharLM(nn.Module):
    """forward(idx (B, T) int64, state=None) -> logits (B, T, V), (h, c) each (layers, B, hidden)."""

    def __init__(self, cfg: ModelConfig, vocab=None):
        """vocab: the data.Vocab the ids index (exported as metadata, used by samplers); None for
        a model built without a corpus."""
        super().__init__()
        if cfg.vocab_size < 1:
            raise UserError("ModelConfig.vocab_size must be set from the corpus before building the model")
        cells = {"lstm": LSTM, "layernorm": LayerNormLSTM}
        if cfg.cell not in cells:
            raise UserError(f"unknown cell {cfg.cell!r}; choose one of {', '.join(cells)}")
        self.cfg, self.vocab = cfg, vocab
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed)
        self.lstm = cells[cfg.cell](cfg.embed, cfg.hidden, cfg.layers, batch_first=True, dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, idx: Tensor, state: tuple[Tensor, Tensor] | None = None):
        x = self.embed(idx)  # (B, T, E)
        y, state = self.lstm(x, state)  # (B, T, H)
        return self.head(self.drop(y)), state  # (B, T, V)

    def init_state(self, batch: int) -> tuple[Tensor, Tensor]:
        z = torch.zeros(self.cfg.layers, batch, self.cfg.hidden)
        return z, z.clone()
