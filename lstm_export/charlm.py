"""Character language model: embedding -> LSTM (or LayerNormLSTM) -> linear head."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import UserError
from .model import LSTM, LayerNormLSTM


class CharLM(nn.Module):
    """forward(idx (B, T) int64, state=None) -> logits (B, T, V), (h, c) each (layers, B, hidden)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise UserError("ModelConfig.vocab_size must be set from the corpus before building the model")
        cells = {"lstm": LSTM, "layernorm": LayerNormLSTM}
        if cfg.cell not in cells:
            raise UserError(f"unknown cell {cfg.cell!r}; choose one of {', '.join(cells)}")
        self.cfg = cfg
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
