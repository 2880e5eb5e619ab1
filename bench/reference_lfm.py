"""Frozen copy of lfmodel/models/lfm.py (and its AdaptiveLinear) as of commit d5666bf, before
issue 12's batched rewrite: experts one by one, the token-mixing kernel [S, S, d] rebuilt with
exp in every forward. The reference that bench/train_step.py times against and that
tests/test_models.py checks the package model against (outputs and gradients). It loads the
package model's state_dict once the stacked expert parameters are split per expert
(lfmodel.models.lfm.per_expert_state). Not part of the package; do not edit. Run as a
script (`make bench` runs every bench/*.py) it does nothing.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # `make bench` runs bench/*.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfmodel.models.common import Monitored  # noqa: E402


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
        y = self.base(x)
        if self.rank > 0:
            y = y + self.up(self.mod(adapt) * self.down(x))
        return y


class TokenMixing(Monitored):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        tau = torch.logspace(0, math.log10(128), d)  # time constants in steps
        lam = (1 - 1 / tau).clamp(1e-3, 1 - 1e-3)
        self.decay_logit = nn.Parameter(torch.log(lam / (1 - lam)))

    def kernel(self, s: int) -> Tensor:
        """K[t, j, c] = (1 - lam_c) lam_c^(t-j) for j <= t, else 0."""
        log_lam = F.logsigmoid(self.decay_logit)
        idx = torch.arange(s, device=log_lam.device)
        lag = (idx[:, None] - idx[None, :]).clamp_min(0).to(log_lam.dtype)
        k = torch.exp(lag[..., None] * log_lam) * (1 - log_lam.exp())
        return k * (idx[:, None] >= idx[None, :])[..., None]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        v = self.inp(self.noisy(x))
        h = torch.einsum("tjc,bjc->btc", self.kernel(x.shape[1]), v)
        return h, self.out(self.observe(F.gelu(h)))


class ChannelMixing(Monitored):
    def __init__(self, d: int, hidden: int, adapt_dim: int, rank: int) -> None:
        super().__init__()
        self.fc1 = AdaptiveLinear(d, hidden, adapt_dim, rank)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        return self.fc2(self.observe(F.gelu(self.fc1(self.noisy(x), a))))


class Expert(ChannelMixing):
    """One expert: an adaptive two-layer MLP (its own prunable group)."""


class MixtureOfExperts(nn.Module):
    """Soft mixture: y_t = sum_e g_te * expert_e(x_t, a_t), g_t = softmax(gate(a_t)).

    `gates` keeps the last [B, S, E] gate probabilities for the entropy loss and logging:
    token_entropy = mean_t H(g_t), usage_entropy = H(mean_t g_t) (lfmodel.entropy).
    """

    def __init__(self, d: int, expert_dim: int, num_experts: int, adapt_dim: int, rank: int):
        super().__init__()
        self.gate = nn.Linear(adapt_dim, num_experts)
        self.experts = nn.ModuleList(
            Expert(d, expert_dim, adapt_dim, rank) for _ in range(num_experts))
        self.gates: Tensor | None = None

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        g = torch.softmax(self.gate(a), dim=-1)
        self.gates = g
        outs = torch.stack([e(x, a) for e in self.experts], dim=-1)  # [B, S, d, E]
        return (outs * g.unsqueeze(-2)).sum(-1)


class Block(nn.Module):
    def __init__(self, d: int, expert_dim: int, num_experts: int, adapt_dim: int, rank: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mix = TokenMixing(d)
        self.adapt = nn.Linear(d, adapt_dim)
        self.channel_mix = ChannelMixing(d, 2 * d, adapt_dim, rank)
        self.moe = MixtureOfExperts(d, expert_dim, num_experts, adapt_dim, rank)

    def forward(self, x: Tensor) -> Tensor:
        h, y = self.token_mix(self.ln1(x))
        a = self.adapt(h)
        x = x + y
        x = x + self.channel_mix(self.ln2(x), a)
        return x + self.moe(self.ln3(x), a)


class LFModel(nn.Module):
    """Tokens [B, S] (long) -> logits [B, S, V]; values [B, S] (float) -> predictions [B, S, 1]."""

    def __init__(
        self,
        vocab_size: int | None,
        d_model: int = 64,
        num_layers: int = 2,
        num_experts: int = 4,
        expert_dim: int = 128,
        adapt_dim: int = 16,
        adapt_rank: int = 4,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(1, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, expert_dim, num_experts, adapt_dim, adapt_rank)
            for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size or 1)

    def forward(self, x: Tensor, return_gates: bool = False):
        h = self.embed(x) if self.vocab_size else self.embed(x.unsqueeze(-1))
        for block in self.blocks:
            h = block(h)
        out = self.head(self.ln_f(h))
        if return_gates:
            return out, [b.moe.gates for b in self.blocks]
        return out
