"""Seed 000's model: Linear -> ReLU(hidden) -> Linear, over a window of the last `context` inputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lfmodel.models.common import Monitored, causal_window


class MLPBody(Monitored):
    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.observe(F.relu(self.fc1(self.noisy(x)))))


class AutoRegressiveModel(nn.Module):
    """Tokens [B, S] (long) -> logits [B, S, V]; or values [B, S] (float) -> [B, S, 1].

    Position t sees inputs t-context+1..t (one-hot for tokens), so it is causal by construction.
    No defaults: build_model passes every size from params (config.DEFAULTS is their one source).
    """

    def __init__(self, vocab_size: int | None, *, context: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.context = context
        width = vocab_size or 1
        self.mlp = MLPBody(context * width, hidden, width)

    def forward(self, x: Tensor, return_gates: bool = False):
        feats = F.one_hot(x, self.vocab_size).float() if self.vocab_size else x.unsqueeze(-1)
        out = self.mlp(causal_window(feats, self.context))
        return (out, []) if return_gates else out
