"""Entropy-adaptive generation (entropix, repaired; DESIGN.md "Known defects").

Per generated token, the next-token distribution's entropy H and varentropy V (nats,
lfmodel.entropy) pick one of four branches:

    branch        condition                     what it does
    greedy        H <  h_thr and V <  v_thr     argmax (confident and consistent)
    temperature   H >= h_thr and V <  v_thr     sample at hot_temperature (uniformly unsure:
                                                several similar options, spread the choice)
    resample      H >= h_thr and V >= v_thr     sample after top-p and min-p truncation
                                                (unsure and inconsistent: drop the tail)
    sample        H <  h_thr and V >= v_thr     plain sample at temperature (mostly sure with
                                                a heavy tail: draw from the model as it is)

The thresholds scale with the vocabulary size K, so they mean the same on a 32-token regime
chain as on a character vocabulary: h_thr = h_frac * log K, v_thr = v_frac * (log K)^2.
Defaults h_frac 0.6, v_frac 0.1 (K = 32: H 2.08 nats, V 1.20 nats^2). On the default regime
data the Bayes-optimal next-token distribution has H 1.9-2.8 nats and V 0.7-2.1 (5-95 %
quantiles, test split), so these send about half its tokens to `temperature`, a third to
`resample`, a seventh to `sample` and almost none to `greedy`: that data is never nearly
certain. reports/samples.md shows the branch each generated token took.

What was wrong in entropix and is right here:
- top-p keeps the smallest set of the most probable tokens whose mass is >= p: probabilities
  sorted DESCENDING (entropix sorted ascending and so kept the least probable tokens);
- min-p removes every token with p < min_p * p_max (entropix computed the mask and never
  applied it);
- the draw is torch.multinomial with an explicit torch.Generator, exact and reproducible
  (entropix's torch sampler over-selects the mode, DESIGN.md); tests/test_sampling.py checks
  the empirical frequencies against the target distribution with a chi-square test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lfmodel.entropy import entropy_from_logits, varentropy_from_logits

BRANCHES = ("greedy", "temperature", "resample", "sample")


@dataclass
class SamplerConfig:
    h_frac: float = 0.6          # entropy threshold, fraction of log K
    v_frac: float = 0.1          # varentropy threshold, fraction of (log K)^2
    temperature: float = 1.0     # base temperature (sample, resample)
    hot_temperature: float = 1.5  # temperature branch
    top_p: float = 0.9           # resample branch
    min_p: float = 0.05          # resample branch

    def thresholds(self, k: int) -> tuple[float, float]:
        """(entropy, varentropy) thresholds in nats / nats^2 for a K-token vocabulary."""
        return self.h_frac * math.log(k), self.v_frac * math.log(k) ** 2


# ---------------------------------------------------------------- truncation and the draw
def top_p_filter(probs: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most probable tokens whose total mass is >= p; renormalize.

    probs [..., K]. Sorted descending; a token is kept when the mass strictly before it is
    < p, so the set stops at the first token that reaches p (at least one token is kept).
    Ties in probability keep the lower token id first (stable sort).
    """
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep_sorted = before < p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return _renormalize(probs * keep)


def min_p_filter(probs: Tensor, min_p: float) -> Tensor:
    """Remove every token with probability < min_p * max probability; renormalize."""
    p_max = probs.max(dim=-1, keepdim=True).values
    return _renormalize(torch.where(probs >= min_p * p_max, probs, torch.zeros_like(probs)))


def _renormalize(probs: Tensor) -> Tensor:
    return probs / probs.sum(-1, keepdim=True)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One unbiased draw per row of probs [..., K] -> ids [...] (torch.multinomial)."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    ids = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return ids.view(probs.shape[:-1])


# ---------------------------------------------------------------- the branch choice
def choose_branch(h: Tensor, v: Tensor, k: int, cfg: SamplerConfig) -> Tensor:
    """Branch index into BRANCHES for entropy h and varentropy v (same shape)."""
    h_thr, v_thr = cfg.thresholds(k)
    high_h, high_v = h >= h_thr, v >= v_thr
    branch = torch.zeros_like(h, dtype=torch.long)              # greedy
    branch[high_h & ~high_v] = BRANCHES.index("temperature")
    branch[high_h & high_v] = BRANCHES.index("resample")
    branch[~high_h & high_v] = BRANCHES.index("sample")
    return branch


def adaptive_sample(logits: Tensor, generator: torch.Generator | None = None,
                    cfg: SamplerConfig | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [..., K] -> (token ids, branch ids, entropy, varentropy), each of shape [...]."""
    cfg = cfg or SamplerConfig()
    logits = logits.float()
    k = logits.shape[-1]
    h, v = entropy_from_logits(logits), varentropy_from_logits(logits)
    branch = choose_branch(h, v, k, cfg)
    base = torch.softmax(logits / cfg.temperature, dim=-1)
    hot = torch.softmax(logits / cfg.hot_temperature, dim=-1)
    truncated = min_p_filter(top_p_filter(base, cfg.top_p), cfg.min_p)
    probs = torch.where((branch == BRANCHES.index("temperature")).unsqueeze(-1), hot, base)
    probs = torch.where((branch == BRANCHES.index("resample")).unsqueeze(-1), truncated, probs)
    drawn = sample_categorical(probs, generator)
    tokens = torch.where(branch == 0, logits.argmax(-1), drawn)
    return tokens, branch, h, v


# ---------------------------------------------------------------- generation
@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Tensor, n: int, generator: torch.Generator,
             cfg: SamplerConfig | None = None, max_context: int | None = None) -> dict:
    """Continue prompt_ids ([S] or [B, S] long) by n tokens, one adaptive draw per token.

    The model sees at most the last `max_context` tokens (None: all). Returns a dict with
    `tokens` (new ids, [n] or [B, n]), `branches` (branch names per token, a list or a list
    per row), `entropy` and `varentropy` (float tensors like tokens).
    """
    single = prompt_ids.dim() == 1
    device = next(model.parameters(), torch.empty(0)).device  # a parameter-free model: cpu
    ids = prompt_ids.unsqueeze(0) if single else prompt_ids
    was_training = model.training
    model.eval()
    new, branch_ids, hs, vs = [], [], [], []
    try:
        for _ in range(n):
            window = ids if max_context is None else ids[:, -max_context:]
            # the model runs on its device; the draw on the CPU, with the CPU generator, so
            # the same seed samples the same tokens on any device
            logits = model(window.to(device))[:, -1, :].cpu()
            tok, br, h, v = adaptive_sample(logits, generator, cfg)
            ids = torch.cat([ids, tok.unsqueeze(1)], dim=1)
            new.append(tok)
            branch_ids.append(br)
            hs.append(h)
            vs.append(v)
    finally:
        model.train(was_training)
    tokens = torch.stack(new, 1) if n else ids.new_zeros((ids.shape[0], 0))
    b_idx = torch.stack(branch_ids, 1) if n else tokens
    ent = torch.stack(hs, 1) if n else tokens.float()
    var = torch.stack(vs, 1) if n else tokens.float()
    branches = [[BRANCHES[i] for i in row] for row in b_idx.tolist()]
    if single:
        return {"tokens": tokens[0], "branches": branches[0], "entropy": ent[0],
                "varentropy": var[0]}
    return {"tokens": tokens, "branches": branches, "entropy": ent, "varentropy": var}


# ---------------------------------------------------------------- reports/samples.md
def write_samples(model: nn.Module, test: dict[str, Tensor], meta: dict, out_path: str | Path,
                  seed: int, n_prompts: int = 4, prompt_len: int = 16, n_new: int = 24,
                  cfg: SamplerConfig | None = None) -> Path | None:
    """Sample continuations of the first test prompts (the split as artifacts.load_split gives
    it, meta as data.load_meta; the trace stage has both loaded already); write markdown with
    the branch per token.

    Token data only: returns None (and writes nothing) for a series model.
    """
    if meta.get("kind") != "tokens":
        return None
    cfg = cfg or SamplerConfig()
    x, y = test["inputs"], test["targets"]
    full = torch.cat([x[:, :1], y], dim=1)  # the whole test sequence
    n_prompts = min(n_prompts, full.shape[0])
    prompt_len = max(1, min(prompt_len, full.shape[1] - 1))
    prompts = full[:n_prompts, :prompt_len]
    generator = torch.Generator().manual_seed(seed)
    out = generate(model, prompts, n_new, generator, cfg, max_context=meta.get("seq_len"))
    vocab = meta.get("vocab")

    def show(t: int) -> str:
        if vocab is None:
            return str(t)
        return repr(vocab[t])[1:-1].replace("|", "\\|").replace("`", "'") or " "

    k = int(meta["vocab_size"])
    h_thr, v_thr = cfg.thresholds(k)
    counts = {b: sum(row.count(b) for row in out["branches"]) for b in BRANCHES}
    lines = [
        "# Sampled continuations (entropy-adaptive sampling)", "",
        f"{n_prompts} test prompts of {prompt_len} tokens, {n_new} new tokens each, seed {seed}. "
        f"Branch per token by output entropy H and varentropy V (nats): H < {h_thr:.3f} and "
        f"V < {v_thr:.3f} greedy; H >= {h_thr:.3f}, V < {v_thr:.3f} temperature "
        f"({cfg.hot_temperature}); both high resample (top-p {cfg.top_p}, min-p {cfg.min_p}); "
        f"low H, high V sample (temperature {cfg.temperature}). Generator: lfmodel.sampling.",
        "", "Branch counts: " + ", ".join(f"{b} {c}" for b, c in counts.items()), "",
    ]
    for i in range(n_prompts):
        truth = full[i, prompt_len:prompt_len + n_new].tolist()
        lines += [f"## Prompt {i + 1} (test sequence {i})", "",
                  "Prompt: `" + " ".join(show(t) for t in prompts[i].tolist()) + "`", "",
                  "Sampled: `" + " ".join(show(t) for t in out["tokens"][i].tolist()) + "`", "",
                  "Test continuation: `" + " ".join(show(t) for t in truth) + "`", "",
                  "| # | token | branch | H | V |", "|---|---|---|---|---|"]
        for j in range(n_new):
            lines.append(f"| {j + 1} | {show(int(out['tokens'][i, j]))} | "
                         f"{out['branches'][i][j]} | {float(out['entropy'][i, j]):.3f} | "
                         f"{float(out['varentropy'][i, j]):.3f} |")
        lines.append("")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(lines))
    return out_path
