"""Entropy-adaptive sampling (lfmodel/sampling.py): an unbiased draw (chi-square), top-p on
descending probabilities, a min-p that removes tokens, every branch reachable, generate(), and
reports/samples.md."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lfmodel.artifacts import load_split
from lfmodel.config import validate
from lfmodel.data import load_meta, prepare
from lfmodel.entropy import entropy_from_logits, varentropy_from_logits
from lfmodel.models import build_model
from lfmodel.sampling import (
    BRANCHES,
    SamplerConfig,
    adaptive_sample,
    choose_branch,
    generate,
    min_p_filter,
    sample_categorical,
    top_p_filter,
    write_samples,
)

N = 20_000
ALPHA = 1e-3  # chi-square tests: reject at p < 0.001 (seeded, so not flaky)


# ---------------------------------------------------------------- chi-square, no scipy
def chi2_sf(stat: float, dof: int) -> float:
    """P(X > stat) for X ~ chi2(dof): 1 - P(dof/2, stat/2), regularized lower incomplete gamma
    by its power series (converges for every x; exact to ~1e-12 here)."""
    a, x = dof / 2, stat / 2
    if x <= 0:
        return 1.0
    term = total = 1.0 / a
    n = 0
    while term > 1e-16 * total:
        n += 1
        term *= x / (a + n)
        total += term
    lower = math.exp(-x + a * math.log(x) - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic over the support of probs (a draw outside it fails the test)."""
    support = probs > 0
    assert int(counts[~support].sum()) == 0, "drew a token of probability 0"
    expected = probs[support].double() * counts.sum()
    stat = float(((counts[support].double() - expected) ** 2 / expected).sum())
    return stat, int(support.sum()) - 1


def test_chi2_sf_matches_tabulated_critical_values():
    # 0.999 quantiles of chi2 (standard tables): the helper must give 0.001 there
    for dof, crit in ((1, 10.828), (4, 18.467), (7, 24.322), (10, 29.588), (31, 61.098)):
        assert chi2_sf(crit, dof) == pytest.approx(1e-3, rel=2e-3)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0))  # closed form for dof 2


def draw_counts(probs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = sample_categorical(probs.expand(N, -1), g)
    return torch.bincount(ids, minlength=probs.shape[-1])


# ---------------------------------------------------------------- the draw
def test_sampler_frequencies_match_target_chi_square():
    g = torch.Generator().manual_seed(123)
    probs = torch.softmax(torch.randn(10, generator=g) * 1.5, dim=-1)
    counts = draw_counts(probs)
    stat, dof = chi2_stat(counts, probs)
    assert chi2_sf(stat, dof) > ALPHA, (stat, dof)
    # the test has power: a sampler 10 % too sharp (mode-biased, entropix's defect) fails it
    sharp = probs ** 1.1 / (probs ** 1.1).sum()
    biased = draw_counts(sharp)
    stat_b, _ = chi2_stat(biased, probs)
    assert chi2_sf(stat_b, dof) < 1e-6, stat_b


def test_sampler_is_reproducible_and_batched():
    probs = torch.softmax(torch.randn(3, 5, 7), dim=-1)
    a = sample_categorical(probs, torch.Generator().manual_seed(5))
    b = sample_categorical(probs, torch.Generator().manual_seed(5))
    assert a.shape == (3, 5) and torch.equal(a, b)
    one_hot = torch.zeros(4, 6)
    one_hot[torch.arange(4), torch.tensor([5, 0, 3, 3])] = 1.0
    assert sample_categorical(one_hot).tolist() == [5, 0, 3, 3]


# ---------------------------------------------------------------- top-p
def test_top_p_keeps_smallest_most_probable_set():
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])
    kept = lambda p: (top_p_filter(probs, p) > 0).nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept(0.3) == [1]           # the top token alone reaches 0.3
    assert kept(0.65) == [1, 3]       # 0.40 + 0.30 = 0.70 >= 0.65
    assert kept(0.71) == [1, 3, 4]    # needs 0.15 too
    assert kept(0.96) == [0, 1, 2, 3, 4]
    out = top_p_filter(probs, 0.65)
    assert out[1] == pytest.approx(0.4 / 0.7) and out.sum() == pytest.approx(1.0)
    # entropix sorted ascending and kept the least probable tokens: never the top one here
    assert kept(1e-6) == [1]


def test_top_p_property_random_distributions():
    g = torch.Generator().manual_seed(7)
    for _ in range(200):
        k = int(torch.randint(2, 40, (1,), generator=g))
        probs = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64) * 2, -1)
        p = float(torch.rand(1, generator=g, dtype=torch.float64)) * 0.98 + 0.01
        keep = top_p_filter(probs, p) > 0
        kept, dropped = probs[keep], probs[~keep]
        assert kept.sum() >= p - 1e-12                     # mass reached
        assert kept.sum() - kept.min() < p                 # and no smaller prefix reaches it
        if dropped.numel():
            assert kept.min() >= dropped.max()             # the most probable ones


# ---------------------------------------------------------------- min-p
def test_min_p_removes_tokens_below_fraction_of_max():
    probs = torch.tensor([0.5, 0.2, 0.04, 0.26])
    out = min_p_filter(probs, 0.1)                         # threshold 0.05: drops 0.04
    assert (out > 0).tolist() == [True, True, False, True]
    assert out.sum() == pytest.approx(1.0)
    assert out[0] / out[1] == pytest.approx(0.5 / 0.2)     # survivors keep their ratios
    assert (min_p_filter(probs, 0.45) > 0).tolist() == [True, False, False, True]
    assert torch.equal(min_p_filter(probs, 0.0), probs / probs.sum())
    assert (min_p_filter(probs, 1.0) > 0).tolist() == [True, False, False, False]
    batch = min_p_filter(torch.tensor([[0.5, 0.2, 0.04, 0.26], [0.1, 0.1, 0.7, 0.1]]), 0.2)
    assert (batch > 0).tolist() == [[True, True, False, True], [False, False, True, False]]


# ---------------------------------------------------------------- branches
def branch_logits(k: int = 32) -> dict[str, torch.Tensor]:
    """One logit row per branch, for K = 32 (thresholds H 2.08 nats, V 1.20 with defaults)."""
    def mix(top: float, n: int) -> torch.Tensor:  # `top` each on tokens 3.., the rest even
        p = torch.full((k,), (1 - n * top) / (k - n))
        p[3:3 + n] = top
        return p.log()

    peaked = torch.zeros(k)
    peaked[3] = 8.0
    return {"greedy": peaked,                   # H 0.08, V 0.6
            "temperature": torch.zeros(k),      # uniform: H = log K, V = 0
            "resample": mix(0.2, 3),            # H 2.68, V 1.71
            "sample": mix(0.8, 1)}              # H 1.19, V 3.71


def test_each_branch_reachable():
    cfg = SamplerConfig()
    for name, logits in branch_logits().items():
        h, v = entropy_from_logits(logits), varentropy_from_logits(logits)
        assert BRANCHES[int(choose_branch(h, v, 32, cfg))] == name, (name, float(h), float(v))
        tok, br, h2, v2 = adaptive_sample(logits.unsqueeze(0), torch.Generator().manual_seed(0))
        assert BRANCHES[int(br)] == name
        assert float(h2) == pytest.approx(float(h)) and float(v2) == pytest.approx(float(v))
    # greedy is the argmax, every time
    row = branch_logits()["greedy"].expand(50, -1)
    toks, br, _, _ = adaptive_sample(row, torch.Generator().manual_seed(0))
    assert toks.tolist() == [3] * 50 and set(br.tolist()) == {0}


@pytest.mark.parametrize("name", ["temperature", "resample", "sample"])
def test_branch_draws_match_branch_distribution(name):
    """Each sampling branch draws exactly from its documented distribution (chi-square)."""
    cfg = SamplerConfig()
    logits = branch_logits()[name]
    logits = logits + torch.linspace(0, 0.3, logits.numel())  # break ties, same branch
    assert BRANCHES[int(choose_branch(entropy_from_logits(logits),
                                      varentropy_from_logits(logits), 32, cfg))] == name
    base = torch.softmax(logits / cfg.temperature, -1)
    target = {"temperature": torch.softmax(logits / cfg.hot_temperature, -1),
              "sample": base,
              "resample": min_p_filter(top_p_filter(base, cfg.top_p), cfg.min_p)}[name]
    toks, br, _, _ = adaptive_sample(logits.expand(N, -1), torch.Generator().manual_seed(1), cfg)
    assert set(br.tolist()) == {BRANCHES.index(name)}
    stat, dof = chi2_stat(torch.bincount(toks, minlength=32), target)
    assert chi2_sf(stat, dof) > ALPHA, (name, stat, dof)
    if name == "resample":  # truncation removed part of the tail, kept the rest
        assert 10 < int((target > 0).sum()) < 32 and dof > 10


# ---------------------------------------------------------------- generate
class Scripted(nn.Module):
    """Logits for the next token depend on the last token: token b -> branch_logits row b."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = torch.stack(list(branch_logits().values()))  # [4, 32]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows[ids.clamp_max(3)]  # [B, S, 32]


def test_generate_reports_branch_per_token():
    out = generate(Scripted(), torch.tensor([0, 1, 0]), 12, torch.Generator().manual_seed(0))
    assert out["tokens"].shape == (12,) and len(out["branches"]) == 12
    assert set(out["branches"]) <= set(BRANCHES)
    # after a prompt ending in token 0 (the greedy row) the first token is the argmax, 3
    assert out["branches"][0] == "greedy" and int(out["tokens"][0]) == 3
    prompts = torch.tensor([[0], [1], [2], [3]])
    out = generate(Scripted(), prompts, 1, torch.Generator().manual_seed(0))
    assert [b[0] for b in out["branches"]] == list(BRANCHES)
    assert out["tokens"].shape == (4, 1) and out["entropy"].shape == (4, 1)


def test_generate_real_model_deterministic_and_restores_mode():
    p = validate({"model": {"d_model": 8, "num_layers": 1, "num_experts": 2, "expert_dim": 8,
                            "adapt_dim": 4, "adapt_rank": 2}})["model"]
    torch.manual_seed(0)
    model = build_model(p, 32).train()
    prompt = torch.randint(0, 32, (2, 5))
    a = generate(model, prompt, 6, torch.Generator().manual_seed(3), max_context=4)
    b = generate(model, prompt, 6, torch.Generator().manual_seed(3), max_context=4)
    assert torch.equal(a["tokens"], b["tokens"]) and a["branches"] == b["branches"]
    assert a["tokens"].shape == (2, 6) and int(a["tokens"].max()) < 32
    assert model.training


# ---------------------------------------------------------------- reports/samples.md
def test_write_samples_markdown(tmp_path):
    params = validate({"data": {"seq_len": 16, "n_train": 16, "n_val": 8, "n_test": 8},
                       "model": {"d_model": 8, "num_layers": 1, "num_experts": 2,
                                 "expert_dim": 8, "adapt_dim": 4, "adapt_rank": 2}})
    data_dir = tmp_path / "prepared"
    prepare(params["data"], 0, data_dir)
    torch.manual_seed(0)
    model = build_model(params["model"], 32)
    test, meta = load_split(data_dir, "test"), load_meta(data_dir)
    out = write_samples(model, test, meta, tmp_path / "samples.md", seed=0, n_prompts=2,
                        prompt_len=4, n_new=5)
    text = out.read_text()
    assert text.count("## Prompt") == 2 and text.count("| branch |") == 2
    rows = [line for line in text.splitlines() if line.startswith("| ") and "branch" not in line]
    assert len(rows) == 10 and all(line.split("|")[3].strip() in BRANCHES for line in rows)
    again = write_samples(model, test, meta, tmp_path / "again.md", seed=0, n_prompts=2,
                          prompt_len=4, n_new=5)
    assert again.read_text() == text  # seeded

    series = {"kind": "series", "vocab_size": None}
    assert write_samples(model, test, series, tmp_path / "none.md", seed=0) is None
    assert not (tmp_path / "none.md").exists()
