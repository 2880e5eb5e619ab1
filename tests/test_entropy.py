"""Entropy measures against hand-computed values (nats), and the regularized loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from lfmodel.entropy import (
    activation_entropy,
    entropy,
    entropy_from_logits,
    gate_entropies,
    normalized_entropy,
    regularized_loss,
    token_activation_entropy,
    varentropy_from_logits,
)
from lfmodel.evaluation import gate_summary, mutual_information, nmi

LN2 = math.log(2)


def close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) < tol


def test_entropy_hand_values():
    p = torch.tensor([0.5, 0.25, 0.25])
    assert close(entropy(p), 1.5 * LN2)                       # 0.5 ln2 + 2 * 0.25 * 2 ln2
    assert close(entropy(torch.tensor([1.0, 0.0, 0.0])), 0.0)  # 0 log 0 = 0, no NaN
    assert close(entropy(torch.full((7,), 1 / 7)), math.log(7))
    assert close(entropy(torch.tensor([0.9, 0.1])), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    batch = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(entropy(batch), torch.tensor([LN2, 0.0]))
    torch.testing.assert_close(entropy(batch.T, dim=0), torch.tensor([LN2, 0.0]))


def test_entropy_from_logits_matches_probabilities():
    assert close(entropy_from_logits(torch.log(torch.tensor([0.5, 0.25, 0.25]))), 1.5 * LN2)
    logits = torch.randn(5, 13) * 3
    torch.testing.assert_close(entropy_from_logits(logits), entropy(torch.softmax(logits, -1)))
    # shift invariant and stable for huge logits
    assert close(entropy_from_logits(torch.tensor([1000.0, 1000.0])), LN2)
    assert close(entropy_from_logits(torch.tensor([1e4, 0.0, 0.0])), 0.0)


def test_varentropy_hand_values():
    # surprisals ln2, 2ln2, 2ln2; H = 1.5 ln2 -> V = 0.5 (0.5 ln2)^2 + 0.5 (0.5 ln2)^2
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    assert close(varentropy_from_logits(logits), 0.25 * LN2 ** 2)
    # two outcomes p, 1-p: V = p(1-p) (log(p/(1-p)))^2
    p = 0.8
    assert close(varentropy_from_logits(torch.log(torch.tensor([p, 1 - p]))),
                 p * (1 - p) * math.log(p / (1 - p)) ** 2, 1e-5)
    assert close(varentropy_from_logits(torch.zeros(9)), 0.0)   # uniform: all surprisals equal
    assert varentropy_from_logits(torch.randn(4, 6)).shape == (4,)


def test_normalized_entropy_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 17):
        p = torch.softmax(torch.randn(200, k, generator=g) * 4, -1)
        h = normalized_entropy(p)
        assert h.shape == (200,)
        assert bool((h >= 0).all()) and bool((h <= 1 + 1e-6).all())
        assert close(normalized_entropy(torch.full((k,), 1 / k)), 1.0)
        assert close(normalized_entropy(torch.nn.functional.one_hot(torch.tensor(1), k).float()), 0)
    assert close(normalized_entropy(torch.ones(1)), 0.0)                 # K = 1: defined, 0
    assert close(normalized_entropy(torch.tensor([0.5, 0.25, 0.25])), 1.5 * LN2 / math.log(3))


def test_gate_token_and_usage_entropy_definitions():
    # each token picks one expert, experts used evenly: token 0, usage ln 2
    tok, use = gate_entropies(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    assert close(tok, 0.0) and close(use, LN2)
    # every token uniform: both ln 4
    tok, use = gate_entropies(torch.full((2, 3, 4), 0.25))
    assert close(tok, math.log(4)) and close(use, math.log(4))
    # all tokens one expert: both 0 (the collapse lambda_balance guards against)
    tok, use = gate_entropies(torch.tensor([[1.0, 0.0, 0.0]] * 5))
    assert close(tok, 0.0) and close(use, 0.0)
    # general case, [B, S, E]: token = mean_t H(g_t), usage = H(mean_t g_t)
    g = torch.softmax(torch.randn(3, 5, 4), -1)
    tok, use = gate_entropies(g)
    flat = g.reshape(-1, 4)
    manual_tok = sum(-(r * r.log()).sum() for r in flat) / 15
    mean = flat.mean(0)
    assert close(tok, manual_tok, 1e-5) and close(use, -(mean * mean.log()).sum(), 1e-5)
    assert float(use) >= float(tok) - 1e-6   # concavity: H(mean) >= mean H


def test_activation_entropy_zero_vector_counts_zero():
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0],    # p = (.5, .5, 0, 0): ln2 / ln4 = 0.5
                      [0.0, 0.0, 0.0, 0.0],    # all zero: 0
                      [2.0, -2.0, 2.0, -2.0]])  # |a| uniform: 1
    h = activation_entropy(a)
    assert torch.isfinite(h) and close(h, 0.5)
    assert close(activation_entropy(torch.zeros(6, 8)), 0.0)
    # [B, S, F] is averaged over every token; one-hot activations have entropy 0
    assert close(activation_entropy(torch.eye(5).repeat(2, 1, 1) * -3.0), 0.0)
    x = torch.randn(2, 7, 16)
    p = x.abs() / x.abs().sum(-1, keepdim=True)
    assert close(activation_entropy(x), (entropy(p) / math.log(16)).mean(), 1e-5)
    assert 0.0 <= float(activation_entropy(torch.relu(x))) <= 1.0


def test_token_activation_entropy_per_token_and_its_mean():
    a = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
                      [[2.0, -2.0, 2.0, -2.0], [0.0, 0.0, 0.0, 5.0]]])
    per_token = token_activation_entropy(a)
    torch.testing.assert_close(per_token, torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    assert close(activation_entropy(a), per_token.mean())
    assert token_activation_entropy(torch.ones(3, 5, 1)).shape == (3, 5)  # F = 1: zeros


def test_mutual_information_hand_case_in_nats():
    # joint (0,0) 1/4, (0,1) 1/4, (1,1) 1/2; marginals a (1/2, 1/2), b (1/4, 3/4)
    a, b = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    mi = 0.25 * math.log(0.25 / (0.5 * 0.25)) + 0.25 * math.log(0.25 / (0.5 * 0.75)) \
        + 0.5 * math.log(0.5 / (0.5 * 0.75))
    assert mutual_information(a, b) == pytest.approx(mi, abs=1e-12)
    assert mutual_information(a, a) == pytest.approx(LN2, abs=1e-12)  # I(a; a) = H(a)
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert nmi(a, b) == pytest.approx(2 * mi / (LN2 + h_b), abs=1e-12)
    assert nmi(b, a) == pytest.approx(nmi(a, b), abs=1e-15)


def test_nmi_independent_identical_and_against_sklearn():
    a = np.repeat([0, 1, 2], 4)             # 12 items: the joint is exactly the product
    b = np.tile([0, 1, 2, 3], 3)            # of the marginals -> I = 0
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)
    assert nmi(a, b) == pytest.approx(0.0, abs=1e-12)
    assert nmi(a, a) == pytest.approx(1.0, abs=1e-12)
    assert nmi(a, np.array([7, 5, 9])[a]) == pytest.approx(1.0, abs=1e-12)  # relabelled
    assert nmi(np.zeros(5), np.zeros(5)) == 0.0                            # nothing to share
    rng = np.random.default_rng(0)
    for k_a, k_b in ((2, 2), (4, 3), (5, 8)):
        x = rng.integers(0, k_a, 500)
        y = (x + rng.integers(0, 2, 500)) % k_b
        assert mutual_information(x, y) == pytest.approx(mutual_info_score(x, y), abs=1e-12)
        assert nmi(x, y) == pytest.approx(
            normalized_mutual_info_score(x, y, average_method="arithmetic"), abs=1e-12)


@pytest.mark.parametrize(("lam", "bal"), [(0.0, 0.0), (0.1, 0.0), (-0.05, 0.0), (0.02, 0.3)])
def test_regularized_loss_formula(lam, bal):
    g = [torch.softmax(torch.randn(2, 6, 4), -1), torch.softmax(torch.randn(2, 6, 4) * 3, -1)]
    task = torch.tensor(2.5)
    loss, parts = regularized_loss(task, g, lam, bal)
    toks = [gate_entropies(x)[0] for x in g]
    uses = [gate_entropies(x)[1] for x in g]
    expected = 2.5 + lam * sum(toks) + bal * sum(math.log(4) - u for u in uses)
    assert close(loss, expected, 1e-5)
    assert set(parts) == {"block0.token_entropy", "block0.usage_entropy",
                          "block1.token_entropy", "block1.usage_entropy"}
    assert close(parts["block1.token_entropy"], toks[1]) and close(parts["block0.usage_entropy"],
                                                                    uses[0])


def test_regularized_loss_gradient_sign():
    """lambda > 0: a gradient step lowers token entropy; lambda < 0 raises it."""
    for lam, sign in [(0.5, -1), (-0.5, 1)]:
        logits = torch.randn(4, 8, 3, generator=torch.Generator().manual_seed(3),
                             requires_grad=True)
        loss, _ = regularized_loss(torch.tensor(0.0), [torch.softmax(logits, -1)], lam)
        loss.backward()
        with torch.no_grad():
            before = gate_entropies(torch.softmax(logits, -1))[0]
            after = gate_entropies(torch.softmax(logits - 0.5 * logits.grad, -1))[0]
        assert sign * float(after - before) > 0
    # no gates (the MLP): the loss is the task loss
    loss, parts = regularized_loss(torch.tensor(1.25), [], 0.1, 0.1)
    assert close(loss, 1.25) and parts == {}


def test_entropy_gradient_finite_for_saturated_gates():
    """A saturated softmax gate has exact zeros; the entropy loss must not turn them into NaN
    gradients (xlogy's d/dp = log p + 1 is -inf at 0, and 0 * -inf = NaN in softmax backward)."""
    logits = torch.tensor([[200.0, 0.0, -200.0], [0.0, 1.0, 2.0]], requires_grad=True)
    g = torch.softmax(logits, -1)
    assert float(g.detach()[0, 1]) == 0.0
    loss, _ = regularized_loss(torch.tensor(0.0), [g], 0.1, 0.1)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert float(logits.grad[1].abs().sum()) > 0


def test_gate_summary_lambda_study_measures_by_hand():
    """Per-layer measures of the lambda sub-study on a 200-token table: expert 0 is top-1 for
    the 100 tokens of regime 0, expert 1 for 99 of regime 1, expert 2 for one token, expert 3
    never. Shares (0.5, 0.495, 0.005, 0): top 0.5, dead 2 of 4; I(expert; regime) by hand."""
    import pandas as pd

    top = np.array([0] * 100 + [1] * 99 + [2])
    regime = np.array([0] * 100 + [1] * 100)
    gates = np.eye(4)[top]
    tokens = pd.DataFrame({"input": np.arange(200) % 5, "regime": regime,
                           "block0.top_expert": top,
                           **{f"block0.g{e}": gates[:, e] for e in range(4)}})
    table = pd.DataFrame({"layer": ["block0"], "token_entropy": [0.0], "usage_entropy": [0.7]})
    out = gate_summary(tokens, table)
    assert out["block0.top_share"] == 0.5
    assert out["block0.dead_share"] == 0.5
    # I = H(regime) - H(regime | expert) = ln 2 - 0 (every expert sees one regime)
    assert out["block0.expert_regime_mi"] == pytest.approx(math.log(2), abs=1e-12)
    assert out["block0.expert_token_mi"] == pytest.approx(mutual_info_score(top, tokens["input"]))
