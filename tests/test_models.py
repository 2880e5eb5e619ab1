"""Both models: shapes, causality (outputs at <= t ignore inputs at > t), batch independence,
the bounded cost of AdaptiveLinear, and the prunable groups."""

from __future__ import annotations

import pytest
import torch

from lfmodel.models import AdaptiveLinear, AutoRegressiveModel, LFModel, build_model, prunable

V = 11          # vocabulary
B, S = 3, 9     # B != S, B > 1


def make(arch: str, vocab: int | None) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "lfm":
        model = LFModel(vocab, d_model=16, num_layers=2, num_experts=3, expert_dim=12,
                        adapt_dim=6, adapt_rank=2)
    else:
        model = AutoRegressiveModel(vocab, context=4, hidden=32)
    return model.eval()


def inputs(vocab: int | None, b: int = B, s: int = S, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if vocab:
        return torch.randint(0, vocab, (b, s), generator=g)
    return torch.randn(b, s, generator=g)


def perturb(x: torch.Tensor, vocab: int | None, where) -> torch.Tensor:
    """A copy of x with every entry at `where` changed (tokens shifted, values redrawn)."""
    y = x.clone()
    if vocab:
        y[where] = (y[where] + 1 + torch.randint(0, vocab - 1, y[where].shape)) % vocab
    else:
        y[where] = y[where] + 1.0 + torch.rand(y[where].shape)
    return y


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


CASES = [("lfm", V), ("lfm", None), ("mlp", V), ("mlp", None)]
IDS = ["lfm-tokens", "lfm-series", "mlp-tokens", "mlp-series"]


@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_output_shape(arch, vocab):
    model = make(arch, vocab)
    for b, s in [(B, S), (5, 2), (1, 7)]:
        out = model(inputs(vocab, b, s))
        assert out.shape == (b, s, vocab or 1)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_causal_future_inputs_do_not_change_past_outputs(arch, vocab, train_mode):
    model = make(arch, vocab).train(train_mode)
    x = inputs(vocab)
    with torch.no_grad():
        base = model(x)
        for t in range(S - 1):
            out = model(perturb(x, vocab, (slice(None), slice(t + 1, None))))
            torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5,
                                       msg=f"output at <= {t} changed with inputs at > {t}")
            # not vacuous: the changed input does reach position t + 1
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_causal_each_position_sees_its_own_input(arch, vocab):
    """Changing only the input at t changes the output at t and nothing before it."""
    model = make(arch, vocab)
    x = inputs(vocab)
    with torch.no_grad():
        base = model(x)
        for t in range(S):
            out = model(perturb(x, vocab, (slice(None), t)))
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert (out[:, t] - base[:, t]).abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("arch", ["lfm", "mlp"])
def test_causal_jacobian_is_lower_triangular(arch):
    """Series inputs: d out_t / d x_j == 0 for every j > t (gradients, not just perturbations)."""
    model = make(arch, None)
    x = inputs(None, 2, 6)
    jac = torch.autograd.functional.jacobian(lambda v: model(v).squeeze(-1), x)  # [b,s,b,s]
    for b in range(2):
        block = jac[b, :, b, :]
        assert torch.all(block.triu(1) == 0), f"future leak:\n{block}"
        assert torch.all(block.diagonal().abs() > 0)


def test_causal_lfm_gates_ignore_future():
    """The MoE gates (from adapt_input) are causal too: the entropy loss must not see the future."""
    model = make("lfm", V)
    x = inputs(V)
    with torch.no_grad():
        _, g0 = model(x, return_gates=True)
        g0 = [g.clone() for g in g0]
        _, g1 = model(perturb(x, V, (slice(None), slice(5, None))), return_gates=True)
    assert len(g0) == 2
    for a, b in zip(g0, g1, strict=True):
        assert a.shape == (B, S, 3)
        torch.testing.assert_close(a.sum(-1), torch.ones(B, S))
        torch.testing.assert_close(b[:, :5], a[:, :5], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_causal_batch_independence(arch, vocab):
    """Sample i's output does not depend on sample j, and equals its output when run alone."""
    model = make(arch, vocab)
    x = inputs(vocab, b=4, s=6)
    with torch.no_grad():
        base = model(x)
        for j in range(4):
            out = model(perturb(x, vocab, (j, slice(None))))
            others = [i for i in range(4) if i != j]
            torch.testing.assert_close(out[others], base[others], rtol=0, atol=1e-5)
            assert (out[j] - base[j]).abs().max() > 1e-4
        for i in range(4):
            torch.testing.assert_close(model(x[i:i + 1])[0], base[i], rtol=1e-5, atol=1e-5)


def test_adaptive_linear_any_batch_and_bounded_cost():
    torch.manual_seed(0)
    lin, r, a_dim = AdaptiveLinear(10, 7, adapt_dim=5, rank=3), 3, 5
    extra = sum(p.numel() for p in lin.parameters()) - (10 * 7 + 7)
    assert extra == r * (10 + 7) + (a_dim + 1) * r
    x, a = torch.randn(4, 6, 10), torch.randn(4, 6, 5)
    y = lin(x, a)
    assert y.shape == (4, 6, 7)
    # per-sample modulation: each token's output uses its own adapt vector only
    a2 = a.clone()
    a2[1, 2] += 1.0
    y2 = lin(x, a2)
    changed = (y2 - y).abs().amax(-1) > 0
    assert changed[1, 2] and changed.sum() == 1
    plain = AdaptiveLinear(10, 7, adapt_dim=5, rank=0)
    assert sum(p.numel() for p in plain.parameters()) == 10 * 7 + 7


def test_build_model_and_prunable_groups():
    lfm = build_model({"arch": "lfm", "d_model": 16, "num_layers": 2, "num_experts": 3,
                       "expert_dim": 12, "adapt_dim": 6, "adapt_rank": 2}, V)
    assert isinstance(lfm, LFModel)
    groups = prunable(lfm)
    assert "block0.moe.expert2" in groups and "block1.token_mix" in groups
    names = [n for g in groups.values() for n in g]
    assert len(names) == len(set(names)), "a weight is in two groups"
    for g in groups.values():
        for n, p in g.items():
            assert p.dim() == 2 and "embed" not in n and "head" not in n
    mlp = build_model({"arch": "mlp", "context": 4, "hidden": 32}, None)
    assert isinstance(mlp, AutoRegressiveModel)
    assert {n for g in prunable(mlp).values() for n in g} == {"mlp.fc1.weight", "mlp.fc2.weight"}
