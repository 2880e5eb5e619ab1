"""Pieces shared by both models: the monitored/prunable group and the adaptive linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfmodel.entropy import activation_entropy


class Monitored(nn.Module):
    """A prunable group ("layer" for sparsity and the adaptive controller).

    Its 2-D weight matrices are the prunable tensors; `observe` records the normalized
    activation entropy of its hidden activation when `monitor` is on (off the hot path
    otherwise); `input_noise` is the controller's low-entropy rule, applied in training only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.monitor = False
        self.input_noise = 0.0
        self.act_entropy: Tensor | None = None

    def noisy(self, x: Tensor) -> Tensor:
        if self.training and self.input_noise > 0:
            x = x + torch.randn_like(x) * self.input_noise
        return x

    def observe(self, act: Tensor) -> Tensor:
        if self.monitor:
            self.act_entropy = activation_entropy(act)
        return act


class AdaptiveLinear(nn.Module):
    """y = W x + b + U (m(a) * (V x)): a per-token, rank-r modulation of W by `adapt`.

    The seed generated a full W from adapt_input (in*out*adapt_dim parameters, batch 1 only).
    Here the extra cost over nn.Linear is r*(in + out) + (adapt_dim + 1)*r parameters, and it
    works for any leading shape: x [..., in], adapt [..., adapt_dim].
    """

    def __init__(self, in_features: int, out_features: int, adapt_dim: int, rank: int) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        self.rank = rank
        if rank > 0:
            self.down = nn.Linear(in_features, rank, bias=False)
            self.up = nn.Linear(rank, out_features, bias=False)
            self.mod = nn.Linear(adapt_dim, rank)
            nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x: Tensor, adapt: Tensor) -> Tensor:
        if self.rank == 0:
            return self.base(x)
        z = self.mod(adapt) * self.down(x)  # one matmul: [x, z] @ [W, U]^T
        return F.linear(torch.cat([x, z], -1), torch.cat([self.base.weight, self.up.weight], 1),
                        self.base.bias)


def causal_window(x: Tensor, context: int) -> Tensor:
    """[B, S, F] -> [B, S, context*F]: at t the inputs t-context+1..t, zeros before the start."""
    b, s, f = x.shape
    padded = F.pad(x, (0, 0, context - 1, 0))
    return padded.unfold(1, context, 1).transpose(2, 3).reshape(b, s, context * f)
