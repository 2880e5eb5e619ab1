"""Both models: shapes, causality (outputs at <= t ignore inputs at > t), batch independence,
the bounded cost of AdaptiveLinear, the prunable groups; the batched LFModel against the frozen
reference (bench/reference_lfm.py), its kernel cache, device cleanliness, no defaults."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lfmodel.config import DEFAULTS
from lfmodel.models import AdaptiveLinear, AutoRegressiveModel, LFModel, build_model, groups, prunable, weight
from lfmodel.models.lfm import DecayKernel, TokenMixing, per_expert_state
from lfmodel.optim import Adam

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
        for n, slot in g.items():
            assert weight(slot).dim() == 2 and "embed" not in n and "head" not in n
    # an expert's weights: slices of its layer's stacked parameters, named as before stacking
    expert = groups["block0.moe.expert2"]
    assert set(expert) == {f"blocks.0.moe.experts.2.{k}" for k in (
        "fc1.base.weight", "fc1.down.weight", "fc1.up.weight", "fc1.mod.weight", "fc2.weight")}
    moe = lfm.blocks[0].moe
    assert expert["blocks.0.moe.experts.2.fc2.weight"] == (moe.w2, 2)
    assert weight((moe.w2, 2)).data_ptr() == moe.w2[2].data_ptr()  # a view: writes reach it
    mlp = build_model({"arch": "mlp", "context": 4, "hidden": 32}, None)
    assert isinstance(mlp, AutoRegressiveModel)
    assert {n for g in prunable(mlp).values() for n in g} == {"mlp.fc1.weight", "mlp.fc2.weight"}


# ---------------------------------------------------------------- issue 12: the batched model
# bench/reference_lfm.py is a frozen copy of the LFModel before batching (experts one by one, the
# token-mixing kernel rebuilt with exp in every forward): the same state_dict once the stacked
# expert parameters are split per expert (per_expert_state).
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reference_lfm", ROOT / "bench/reference_lfm.py")
reference_lfm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_lfm)

SIZES = [dict(d_model=16, num_layers=2, num_experts=3, expert_dim=12, adapt_dim=6, adapt_rank=2),
         dict(d_model=8, num_layers=1, num_experts=4, expert_dim=8, adapt_dim=4, adapt_rank=0)]


def pair(vocab: int | None, sizes: dict, seed: int = 0) -> tuple[LFModel, torch.nn.Module]:
    """The package model and the reference with the same weights (decays moved off their init)."""
    torch.manual_seed(seed)
    new = LFModel(vocab, **sizes)
    with torch.random.fork_rng():
        order = list(reference_lfm.LFModel(vocab, **sizes).state_dict())
    views = per_expert_state(dict(new.named_parameters()))  # experts: views into the stacks
    with torch.no_grad():
        for name in order:  # random weights everywhere, the low-rank `up` included, drawn in
            views[name].add_(0.3 * torch.randn_like(views[name]))  # the per-expert order
    ref = reference_lfm.LFModel(vocab, **sizes)
    ref.load_state_dict(per_expert_state(new.state_dict()))
    return new, ref


def loss_and_grads(model, x, y):
    out, gates = model(x, return_gates=True)
    loss = (out * y).sum() + sum((g * g.log()).sum() for g in gates)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    return out, gates, per_expert_state(dict(zip(names, grads, strict=True)))


@pytest.mark.parametrize("sizes", SIZES, ids=["rank2", "rank0"])
@pytest.mark.parametrize("vocab", [V, None], ids=["tokens", "series"])
def test_batched_lfm_equals_reference_outputs_and_gradients(vocab, sizes):
    """Outputs, gates and every parameter's gradient equal the reference's to 1e-5 (the op order
    differs, so not bit for bit), in training mode, on random inputs and random weights.

    Gradients to 1e-5 of their scale: here they reach ~30, where float32 itself is only good to
    ~1e-5 absolute (against a float64 evaluation both models are off by up to 1.9e-5)."""
    new, ref = pair(vocab, sizes)
    torch.manual_seed(5)  # the same seed initializes both alike (stacking keeps the draws)
    fresh = LFModel(vocab, **sizes)
    torch.manual_seed(5)
    old = reference_lfm.LFModel(vocab, **sizes).state_dict()
    split = per_expert_state(fresh.state_dict())
    assert split.keys() == old.keys() and all(torch.equal(split[k], old[k]) for k in old)
    x = inputs(vocab, 4, 13, seed=3)
    y = torch.randn(4, 13, vocab or 1, generator=torch.Generator().manual_seed(4))
    out1, gates1, grads1 = loss_and_grads(new.train(), x, y)
    out0, gates0, grads0 = loss_and_grads(ref.train(), x, y)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    for g1, g0 in zip(gates1, gates0, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads0.keys()
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads1[name], g0, rtol=1e-5,
                                   atol=1e-5 * max(1.0, g0.abs().max().item()), msg=name)
        assert g0.abs().max() > 0, f"{name}: zero gradient, the comparison is vacuous"


def test_batched_lfm_monitoring_and_input_noise_per_expert():
    """Per-expert activation entropy (the controller's input) and per-expert input noise (its
    low-entropy rule) are still per expert: equal to the reference's, same noise draws."""
    new, ref = pair(V, SIZES[0])
    for model in (new, ref):
        for name, mod in groups(model).items():
            mod.monitor = True
            mod.input_noise = 0.5 if name == "block1.moe.expert1" else 0.0
        model.train()
    x = inputs(V, 3, 9)
    torch.manual_seed(7)
    out1 = new(x)
    torch.manual_seed(7)
    out0 = ref(x)
    torch.testing.assert_close(out1, out0, rtol=1e-5, atol=1e-5)
    g1, g0 = groups(new), groups(ref)
    assert g1.keys() == g0.keys()
    values = {}
    for name in g0:
        torch.testing.assert_close(g1[name].act_entropy, g0[name].act_entropy, rtol=1e-5,
                                   atol=1e-6, msg=name)
        values[name] = g1[name].act_entropy.item()
    assert len(set(values.values())) == len(values)  # each group its own activations


def test_token_mixing_kernel_cache_follows_the_parameters():
    """Without a graph the kernel is reused, but never after decay_logit changes (optimizer
    step, load_state_dict); a shorter sequence reads the corner of a longer cached kernel."""
    new, ref = pair(V, SIZES[0])
    new.eval(), ref.eval()
    x = inputs(V, 2, 12)
    tm = new.blocks[0].token_mix
    with torch.no_grad():
        new(x)
        k = tm._kernel[1]
        new(x)
        assert tm._kernel[1] is k  # cached
        torch.testing.assert_close(new(x[:, :5]), ref(x[:, :5]), rtol=1e-5, atol=1e-5)
    opt = torch.optim.SGD(new.parameters(), lr=0.5)  # a real step moves every decay
    new.train()
    new(x).sum().backward()
    opt.step()
    new.eval()
    ref.load_state_dict(per_expert_state(new.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)
        new.load_state_dict(pair(V, SIZES[0], seed=1)[0].state_dict())
        ref.load_state_dict(per_expert_state(new.state_dict()))
        torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5)
    # the project's Adam (fused) and a write through .data change decay_logit without bumping
    # its version counter; an eval forward between backward and step cached the old kernel
    opt = Adam(new.parameters(), lr=0.05, weight_decay=0.0)
    for change in ("adam", "adam", "data"):  # torch's first step, then the direct one
        new.train()
        new(x).sum().backward()
        new.eval()
        with torch.no_grad():
            new(x)
            if change == "adam":
                opt.step()
            else:
                tm.decay_logit.data.add_(0.5)
            ref.load_state_dict(per_expert_state(new.state_dict()))
            torch.testing.assert_close(new(x), ref(x), rtol=1e-5, atol=1e-5, msg=change)
        opt.zero_grad()


def test_decay_kernel_gradient_in_closed_form():
    """DecayKernel's backward (dK/dp = K (l (1 - lam) - lam)) against finite differences, in
    float64, with decays from fast to slow."""
    p = torch.linspace(-3.0, 5.0, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: DecayKernel.apply(q, 9), (p,))
    # a gradient arriving transposed (not contiguous) is read as well
    assert torch.autograd.gradcheck(lambda q: DecayKernel.apply(q, 9).transpose(1, 2), (p,))


def test_token_mixing_kernel_has_no_subnormal_entries():
    """Entries that underflow float32's normal range are exact zeros, not subnormals (which slow
    the matmuls reading the kernel ~2.6x on x86); every other entry is (1 - lam) lam^(t - j)."""
    tm = TokenMixing(16)  # at init the fastest channel has lam = 1e-3: lam^13 < 1e-38
    s = 64
    k = tm.kernel(s).detach()
    tiny = torch.finfo(k.dtype).tiny
    assert not ((k != 0) & (k.abs() < tiny)).any()
    lam = torch.sigmoid(tm.decay_logit.detach().double())[:, None, None]
    lag = torch.arange(s)[None, :] - torch.arange(s)[:, None]  # [j, t]: t - j
    exact = torch.where(lag >= 0, (1 - lam) * lam ** lag.clamp_min(0), 0.0)
    assert ((exact > 0) & (exact < tiny / 2)).any()  # the case this test is about occurs
    assert (k[exact < tiny / 2] == 0).all()
    normal = exact >= 2 * tiny
    torch.testing.assert_close(k.double()[normal], exact[normal], rtol=1e-4, atol=0)


@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_models_follow_the_device_of_their_weights(arch, vocab):
    """No tensor is created on the CPU implicitly: forward and backward run on the meta device
    (a CPU tensor mixed in would raise), in training and in eval (the cached kernel)."""
    model = make(arch, vocab).to("meta").train()
    x = inputs(vocab).to("meta")
    out, _ = model(x, return_gates=True)
    assert out.device.type == "meta"
    out.sum().backward()
    assert all(p.grad.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).device.type == "meta"


def test_models_have_no_constructor_defaults():
    """Sizes come from params only (config.DEFAULTS is their one source): build_model on the
    defaults gives the defaults' sizes, and a model built without them is an error."""
    p = DEFAULTS["model"]
    lfm = build_model(p, V)
    moe = lfm.blocks[0].moe
    assert moe.w1.shape == (p["num_experts"], p["expert_dim"], p["d_model"])
    assert len(lfm.blocks) == p["num_layers"] and len(moe.experts) == p["num_experts"]
    assert lfm.head.in_features == p["d_model"] and moe.rank == p["adapt_rank"]
    assert moe.down.shape == (p["num_experts"], p["adapt_rank"], p["d_model"])
    mlp = build_model({**p, "arch": "mlp"}, V)
    assert mlp.context == p["context"] and mlp.mlp.fc1.out_features == p["hidden"]
    with pytest.raises(TypeError):
        LFModel(V)
    with pytest.raises(TypeError):
        AutoRegressiveModel(V)
