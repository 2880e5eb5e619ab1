"""Entropy measures (nats) and the entropy-regularized loss; definitions from DESIGN.md."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy_from_logits(logits: Tensor, dim: int = -1) -> Tensor:
    """H(softmax(logits)) = -sum p log p, stable in log space."""
    logp = torch.log_softmax(logits, dim=dim)
    return -(logp.exp() * logp).sum(dim)


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """H(p) for probabilities p; 0 log 0 = 0.

    log is taken of p clamped to the smallest normal float: a saturated softmax gate has exact
    zeros, where xlogy's gradient (log p + 1) is -inf and turns the softmax backward into NaN.
    """
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim)


def varentropy_from_logits(logits: Tensor, dim: int = -1) -> Tensor:
    """V(p) = sum p (log p + H)^2: the spread of surprisal (entropix)."""
    logp = torch.log_softmax(logits, dim=dim)
    p = logp.exp()
    h = -(p * logp).sum(dim, keepdim=True)
    return (p * (logp + h) ** 2).sum(dim)


def normalized_entropy(p: Tensor, dim: int = -1) -> Tensor:
    """H(p) / log K, in [0, 1] (0 when K == 1)."""
    k = p.shape[dim]
    return entropy(p, dim) / math.log(k) if k > 1 else torch.zeros_like(p.sum(dim))


def gate_entropies(gates: Tensor) -> tuple[Tensor, Tensor]:
    """(token_entropy, usage_entropy) of gate probabilities [..., E].

    token_entropy = mean_t H(g_t): how many experts one token uses.
    usage_entropy = H(mean_t g_t): how evenly the experts are used overall.
    """
    g = gates.reshape(-1, gates.shape[-1])
    return entropy(g).mean(), entropy(g.mean(0))


def token_activation_entropy(act: Tensor) -> Tensor:
    """Per token H(|a| / sum |a|) / log F over the last dim; an all-zero vector counts as 0.

    The one definition: `activation_entropy` (training monitor) is its mean, the trace stage
    stores it per token.
    """
    a = act.detach().abs().float()
    f = a.shape[-1]
    if f < 2:
        return a.new_zeros(a.shape[:-1])
    p = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return entropy(p) / math.log(f)


def activation_entropy(act: Tensor) -> Tensor:
    """Mean over tokens of `token_activation_entropy`: in [0, 1]."""
    return token_activation_entropy(act.reshape(-1, act.shape[-1])).mean()


def regularized_loss(
    task_loss: Tensor,
    gates: list[Tensor],
    lambda_entropy: float,
    lambda_balance: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """task + lambda_entropy * sum token_entropy + lambda_balance * sum (log E - usage_entropy).

    Returns the loss and the (graph-attached) per-layer gate entropies for logging.
    """
    loss = task_loss
    parts: dict[str, Tensor] = {}
    for i, g in enumerate(gates):
        tok, use = gate_entropies(g)
        parts[f"block{i}.token_entropy"] = tok
        parts[f"block{i}.usage_entropy"] = use
        if lambda_entropy:
            loss = loss + lambda_entropy * tok
        if lambda_balance:
            loss = loss + lambda_balance * (math.log(g.shape[-1]) - use)
    return loss, parts
