"""The Liquid Foundation Model of seed 002, repaired (see DESIGN.md "Known defects").

Per block, pre-norm residual:
    h, y = TokenMixing(x)        causal: per-channel leaky integrators over positions
    a    = adapt(h)              adapt_input: a causal multi-timescale summary of the prefix
    x    = x + y
    x    = x + ChannelMixing(x, a)
    x    = x + MixtureOfExperts(x, a)   per-token gate g_t = softmax(W a_t)

The token mixer is the "liquid" part: h_t = lam * h_{t-1} + (1 - lam) * v_t with a learned
time constant per channel (1 to ~128 steps at init). That recursion is the shape of the Bayes
filter over a hidden regime, and unlike the seed's full-sequence mean it never sees the future.

Speed (issue 12): each MoE layer's expert weights are stacked parameters ([E, ...], one matmul
per layer of experts); each expert is still its own prunable group, with per-expert masks (named
as before the stacking), monitoring and input noise; the token-mixing kernel is built from
S powers per channel instead of S*S, its gradient taken in closed form (DecayKernel), and
cached while its parameters do not change; activations are [B*S, d] from the embedding to the
head, so that no layer reshapes (a view costs an autograd node). The math is that of
bench/reference_lfm.py (equal to 1e-5, not bit-identical: the op order differs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfmodel.models.common import AdaptiveLinear, Monitored


def decay_kernel(decay_logit: Tensor, s: int) -> Tensor:
    """K[c, j, t] = (1 - lam_c) lam_c^(t-j) for j <= t, else 0 (and 0 where that underflows
    float's normal range), lam = sigmoid(decay_logit): per channel, the causal Toeplitz kernel
    from inputs j to outputs t (transposed, as the matmul reads it). No autograd (DecayKernel).

    Built from the S powers (1 - lam) lam^l (S*d exps, not S*S*d) laid out by an unfold.
    """
    p = decay_logit
    lag = torch.arange(s, device=p.device, dtype=p.dtype)
    log_powers = torch.addcmul(F.logsigmoid(-p)[:, None], F.logsigmoid(p)[:, None], lag)
    # powers below the smallest normal float are exact zeros: subnormal entries (lam^l of the
    # fast channels) slowed the matmuls reading the kernel 2.6x on x86, and next to the lag-0
    # term (1 - lam) v_t no float sum can hold them
    powers = torch.exp(log_powers).masked_fill(log_powers < math.log(torch.finfo(p.dtype).tiny), 0)
    row = F.pad(powers, (s - 1, 0))  # [d, 2S-1]
    return row.unfold(-1, s, 1).flip(-2)  # row j: j zeros, then lags 0, 1, ..., S-1-j


class DecayKernel(torch.autograd.Function):
    """decay_kernel with its gradient in closed form: dK/dp = K (l (1 - lam) - lam) for lag
    l = t - j, so dL/dp_c = (1 - lam_c) sum G l - lam_c sum G, G = dL/dK * K: one product and two
    reductions instead of autograd back through the flip, the unfold and the exp (the default
    model's training step ran 1.0 % faster at 1 thread, 2.6 % at 2)."""

    @staticmethod
    def forward(ctx, decay_logit: Tensor, s: int) -> Tensor:
        k = decay_kernel(decay_logit, s)
        ctx.save_for_backward(decay_logit, k)
        return k

    @staticmethod
    def backward(ctx, grad_k: Tensor) -> tuple[Tensor, None]:
        p, k = ctx.saved_tensors
        s = k.shape[-1]
        g = torch.mul(grad_k, k).reshape(p.shape[0], -1)  # G, [d, S*S]
        pos = torch.arange(s, device=p.device, dtype=p.dtype)
        gl = torch.mv(g, (pos - pos[:, None]).view(-1))  # sum G l (K, so G, is 0 where l < 0)
        return gl - torch.sigmoid(p) * (gl + g.sum(-1)), None


class TokenMixing(Monitored):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, d)
        tau = torch.logspace(0, math.log10(128), d)  # time constants in steps
        lam = (1 - 1 / tau).clamp(1e-3, 1 - 1e-3)
        self.decay_logit = nn.Parameter(torch.log(lam / (1 - lam)))
        self._kernel: tuple[Tensor, Tensor] | None = None  # (decay_logit, [d, S, S]) cached

    def kernel(self, s: int) -> Tensor:
        """decay_kernel(decay_logit, s). Without a graph (eval, trace, sampling) it is kept
        while decay_logit holds the values it was built from (compared, d numbers: fused Adam
        and writes through .data change a parameter without bumping its version counter); a
        shorter S reads the top-left corner of a longer kernel. Not kept on the meta device,
        which has no values to compare."""
        p = self.decay_logit
        if torch.is_grad_enabled() and p.requires_grad:
            self._kernel = None
            return DecayKernel.apply(p, s)
        cached = self._kernel
        if not (cached and cached[1].shape[1] >= s and cached[0].dtype == p.dtype
                and cached[0].device == p.device and p.device.type != "meta"
                and torch.equal(cached[0], p)):
            cached = self._kernel = (p.detach().clone(), decay_kernel(p.detach(), s))
        return cached[1][:, :s, :s]

    def forward(self, x: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """x: [B*S, d], sequences of length s one after another. Channels first, [d, B, S], so
        that the mix over positions is one batched matmul over channels on contiguous operands;
        h and gelu(h) go back to [B*S, d] as free (transposed) views, the gelu taken before:
        torch's CPU gelu on the transposed view ran 1.7x as long (1.3x its backward)."""
        d = x.shape[1]
        v = torch.addmm(self.inp.bias[:, None], self.inp.weight, self.noisy(x).T)
        h = torch.bmm(v.view(d, -1, s), self.kernel(s)).view(d, -1)  # [d, B*S]
        return h.T, self.out(self.observe(F.gelu(h).T))


class ChannelMixing(Monitored):
    def __init__(self, d: int, hidden: int, adapt_dim: int, rank: int) -> None:
        super().__init__()
        self.fc1 = AdaptiveLinear(d, hidden, adapt_dim, rank)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        return self.fc2(self.observe(F.gelu(self.fc1(self.noisy(x), a))))


class Expert(Monitored):
    """One expert's prunable group: its monitor, input noise and activation entropy. Its
    weights are slice `index` of MixtureOfExperts' stacked parameters (models.prunable)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index


class MixtureOfExperts(nn.Module):
    """Soft mixture: y_t = sum_e g_te * expert_e(x_t, a_t), g_t = softmax(gate(a_t)).

    `gates` keeps the last [tokens, E] gate probabilities (LFModel returns them as [B, S, E])
    for the entropy loss and logging:
    token_entropy = mean_t H(g_t), usage_entropy = H(mean_t g_t) (lfmodel.entropy).
    Expert e is an adaptive two-layer MLP (ChannelMixing's function) whose weights are slice e
    of stacked parameters, [E, ...] each; PER_EXPERT maps them to the per-expert module paths
    they replace, which the slices keep as names for masks. All experts run together: the first
    layers as one matmul, [x, m * down(x)] against [W_1; ...; W_E | block_diag(up_1, ...,
    up_E)] (per expert only while the controller adds input noise to some of them), and
    sum_e g_e (W2_e h_e + b2_e) as one matmul of the gate-scaled activations against the second
    layers side by side, plus g @ b2.
    """

    PER_EXPERT = {"w1": "fc1.base.weight", "b1": "fc1.base.bias", "down": "fc1.down.weight",
                  "up": "fc1.up.weight", "mod_w": "fc1.mod.weight", "mod_b": "fc1.mod.bias",
                  "w2": "fc2.weight", "b2": "fc2.bias"}

    def __init__(self, d: int, expert_dim: int, num_experts: int, adapt_dim: int, rank: int):
        super().__init__()
        self.gate = nn.Linear(adapt_dim, num_experts)
        # built as E ChannelMixing modules (the same initial values for a seed), then stacked
        mlps = [ChannelMixing(d, expert_dim, adapt_dim, rank) for _ in range(num_experts)]
        for name, path in self.PER_EXPERT.items():
            if rank or path.startswith(("fc1.base", "fc2")):
                setattr(self, name, nn.Parameter(torch.stack(
                    [m.get_parameter(path).detach() for m in mlps])))
        self.rank = rank
        self.experts = nn.ModuleList(Expert(i) for i in range(num_experts))
        self.gates: Tensor | None = None

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        # gate logits experts-first, [E, tokens], softmax over dim 0: torch's CPU softmax over a
        # last dim of 4 is ~10x slower (179 vs 18 us); g is [tokens, E] again as a free view
        logits = torch.addmm(self.gate.bias[:, None], self.gate.weight, a.T)
        g = torch.softmax(logits, dim=0).T
        self.gates = g
        experts = list(self.experts)
        xs = [e.noisy(x) for e in experts]
        same = all(xi is x for xi in xs)
        if self.rank:  # [x, m * down(x)] @ [W_base; block_diag(up)]: base and modulation in one
            m = F.linear(a, self.mod_w.flatten(0, 1), self.mod_b.flatten())
            down = (F.linear(x, self.down.flatten(0, 1)) if same else
                    torch.cat([F.linear(xi, self.down[i]) for i, xi in enumerate(xs)], -1))
            z = m * down  # [B, S, E*r]
            up = torch.block_diag(*self.up.unbind(0))  # [E*H, E*r]
            if same:
                w = torch.cat([self.w1.flatten(0, 1), up], 1)
                pre = F.linear(torch.cat([x, z], -1), w, self.b1.flatten())
            else:
                pre = self.first_layers(xs) + F.linear(z, up)
        else:
            pre = (F.linear(x, self.w1.flatten(0, 1), self.b1.flatten()) if same else
                   self.first_layers(xs))
        act = F.gelu(pre.unflatten(-1, (len(experts), -1)))  # [B, S, E, H]
        for i, e in enumerate(experts):
            if e.monitor:
                e.observe(act[..., i, :])
        w2 = self.w2.permute(1, 0, 2).flatten(1)  # [d, E*H]
        return F.linear((act * g.unsqueeze(-1)).flatten(-2), w2) + g @ self.b2

    def first_layers(self, xs: list[Tensor]) -> Tensor:
        """W1_e xs[e] + b1_e for each e, side by side: the per-expert path (input noise)."""
        return torch.cat([F.linear(xi, self.w1[i], self.b1[i]) for i, xi in enumerate(xs)], -1)

    def expert_weights(self, prefix: str, e: int) -> dict[str, tuple[nn.Parameter, int]]:
        """{name: (stacked parameter, e)} for expert e's 2-D weights, named as the per-expert
        module path they replace (`<prefix>.experts.<e>.fc2.weight`)."""
        return {f"{prefix}.experts.{e}.{path}": (self.get_parameter(name), e)
                for name, path in self.PER_EXPERT.items()
                if path.endswith("weight") and hasattr(self, name)}


def per_expert_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state_dict with each stacked expert parameter split into the per-expert entries it
    replaces (`...moe.experts.<e>.fc1.base.weight`, ...): the layout of the LFModel before the
    stacking, which bench/reference_lfm.py keeps."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix.endswith("moe") and name in MixtureOfExperts.PER_EXPERT:
            for e, v in enumerate(value.unbind(0)):
                out[f"{prefix}.experts.{e}.{MixtureOfExperts.PER_EXPERT[name]}"] = v
        else:
            out[key] = value
    return out


class Block(nn.Module):
    def __init__(self, d: int, expert_dim: int, num_experts: int, adapt_dim: int, rank: int):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mix = TokenMixing(d)
        self.adapt = nn.Linear(d, adapt_dim)
        self.channel_mix = ChannelMixing(d, 2 * d, adapt_dim, rank)
        self.moe = MixtureOfExperts(d, expert_dim, num_experts, adapt_dim, rank)

    def forward(self, x: Tensor, s: int) -> Tensor:
        h, y = self.token_mix(self.ln1(x), s)
        a = self.adapt(h)
        x = x + y
        x = x + self.channel_mix(self.ln2(x), a)
        return x + self.moe(self.ln3(x), a)


class LFModel(nn.Module):
    """Tokens [B, S] (long) -> logits [B, S, V]; values [B, S] (float) -> predictions [B, S, 1].

    No defaults: build_model passes every size from params (config.DEFAULTS is their one source).
    """

    def __init__(self, vocab_size: int | None, *, d_model: int, num_layers: int,
                 num_experts: int, expert_dim: int, adapt_dim: int, adapt_rank: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model) if vocab_size else nn.Linear(1, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, expert_dim, num_experts, adapt_dim, adapt_rank)
            for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size or 1)

    def forward(self, x: Tensor, return_gates: bool = False):
        b, s = x.shape
        h = self.embed(x.reshape(-1)) if self.vocab_size else self.embed(x.reshape(-1, 1))
        for block in self.blocks:  # [B*S, d] throughout: no view (and its backward) per layer
            h = block(h, s)
        out = self.head(self.ln_f(h)).view(b, s, -1)
        if return_gates:
            return out, [blk.moe.gates.view(b, s, -1) for blk in self.blocks]
        return out
