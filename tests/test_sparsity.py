"""Persistent masks, collapse / surge / rewire, and the fixed schedules (dense, static,
gradual, interval, rigl), through the real Trainer where the per-step order matters."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from test_training import train_config
from torch import nn

from lfmodel.models import AutoRegressiveModel, LFModel, Monitored
from lfmodel.sparsity import MaskSet, build_schedule, lowest_k
from lfmodel.sparsity import masks as masks_module
from lfmodel.sparsity.masks import FAST_PATH_MIN, kth_in_band, kth_smallest, sample_positions
from lfmodel.training import Trainer

V = 8
PACKAGE = Path(__file__).resolve().parents[1] / "lfmodel"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def token_data(n: int = 64, s: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, s + 1), generator=g)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def make_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "lfm":
        return LFModel(V, d_model=16, num_layers=1, num_experts=2, expert_dim=16, adapt_dim=8,
                       adapt_rank=2)
    return AutoRegressiveModel(V, context=4, hidden=64)


def make_trainer(model: nn.Module, steps: int, hooks=None, **kw) -> Trainer:
    cfg = train_config(**{"steps": steps, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0,
                          "eval_every": 10**6, "log_every": 10**6, **kw})
    return Trainer(model, token_data(), token_data(16, seed=1), cfg, hooks)


def surge_params(**kw) -> dict:
    p = {"mode": "interval", "target_sparsity": 0.5, "scope": "layer", "start_fraction": 0.3,
         "collapse_every": 10, "surge_every": 20, "regrow": "random", "recovery": 0.25,
         "noise_scale": 0.5, "rigl_every": 5, "drop_fraction": 0.3, "rigl_end_fraction": 0.75,
         "gradual_start_fraction": 0.1, "gradual_end_fraction": 0.6, "gradual_every": 3}
    p.update(kw)
    return p


def check_masked(masks: MaskSet, grads: bool = True) -> None:
    """The invariant: pruned entries are exactly 0, and so are their grads and Adam moments
    (for an expert: its slice of the MoE layer's stacked parameter, gradient and moments).

    (grads=False right after an out-of-step collapse: the stale dense gradient is masked by the
    next step's mask_grads; collapse keeps it, a same-step gradient surge needs it.)"""
    for n, p in masks.params.items():
        off = ~masks.masks[n]
        assert torch.all(p.detach()[off] == 0), f"{n}: a pruned weight is non-zero"
        g = masks.grad(n)
        if grads and g is not None:
            assert torch.all(g[off] == 0), f"{n}: a pruned gradient is non-zero"
        moments = masks.state(n)
        assert len(moments) == 2
        for m in moments:
            assert torch.all(m[off] == 0), f"{n}: a pruned Adam moment is non-zero"


def zero_fraction(p: torch.Tensor) -> float:
    return float((p.detach() == 0).sum()) / p.numel()


# ---------------------------------------------------------------- lowest_k / collapse
def test_mask_lowest_k_exact_with_ties():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0, 0.5, 1.0])
    for k in range(0, 8):
        m = lowest_k(scores, k)
        assert int(m.sum()) == k
        if 0 < k < 7:  # everything chosen is <= everything left
            assert scores[m].max() <= scores[~m].min()
    assert lowest_k(scores.view(7, 1), 3).shape == (7, 1)
    assert int(lowest_k(torch.zeros(5, 4), 7).sum()) == 7   # all tied


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("arch", ["lfm", "mlp"])
def test_mask_collapse_persists_through_50_adam_steps(arch, scope):
    model = make_model(arch)
    trainer = make_trainer(model, steps=10, weight_decay=1e-3)
    trainer.fit()   # 10 dense steps first, so Adam moments are non-zero at the collapse
    masks = trainer.masks
    assert all(bool((masks.state(n)[0] != 0).any()) for n in masks.params)
    pruned = masks.collapse(0.8, scope)
    total = sum(p.numel() for p in masks.params.values())
    assert pruned == round(0.8 * total) if scope == "global" else pruned > 0
    frozen = {n: m.clone() for n, m in masks.masks.items()}
    active_before = {n: p.detach()[frozen[n]].clone() for n, p in masks.params.items()}
    check_masked(masks, grads=False)

    trainer.cfg.steps = 60
    trainer.fit()   # 50 Adam steps: mask_grads -> step -> apply
    assert trainer.step == 60
    check_masked(masks)
    for n, p in masks.params.items():
        assert torch.equal(masks.masks[n], frozen[n]), f"{n}: mask changed without a schedule"
        if scope == "layer":
            assert abs(zero_fraction(p) - 0.8) <= 1 / p.numel(), n
    zeros = sum(int((p == 0).sum()) for p in masks.params.values())
    if scope == "global":   # one exact threshold over all tensors
        assert zeros == round(0.8 * total)
        assert abs(masks.sparsity() - 0.8) <= 1 / total
    else:                   # rounded per tensor
        assert zeros == sum(round(0.8 * p.numel()) for p in masks.params.values())
    # the surviving weights did train (global scope may prune a whole small tensor, e.g. the
    # LFModel's low-rank `up`, initialized at std 0.02)
    alive = [n for n in masks.params if bool(frozen[n].any())]
    moved = [n for n in alive
             if bool((masks.params[n].detach()[frozen[n]] != active_before[n]).any())]
    assert len(moved) == len(alive) if scope == "layer" else len(moved) >= 0.7 * len(alive)
    # biases, norms and embeddings are not prunable and stay dense
    prunable_ids = {id(p) for p, _ in masks.slots.values()}
    for n, p in model.named_parameters():
        if id(p) not in prunable_ids:
            assert zero_fraction(p) < 0.5, n


def test_mask_manual_sequence_with_adam():
    """The same invariant without the Trainer: backward -> mask_grads -> step -> apply."""
    model = make_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masks = MaskSet(model, opt)
    data = token_data()
    x, y = data["inputs"][:16], data["targets"][:16]

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        masks.mask_grads()
        opt.step()
        masks.apply()

    step()
    masks.collapse(0.8, "layer")
    for _ in range(50):
        step()
    check_masked(masks)
    for p in masks.params.values():
        assert abs(zero_fraction(p) - 0.8) <= 1 / p.numel()


def test_mask_collapse_is_monotone_and_keeps_old_pruned():
    model = make_model("mlp")
    masks = MaskSet(model)
    masks.collapse(0.5, "layer")
    first = {n: m.clone() for n, m in masks.masks.items()}
    assert masks.collapse(0.3, "layer") == 0                  # lower target: nothing to prune
    masks.collapse(0.8, "layer")
    for n, p in masks.params.items():
        assert not bool((~first[n] & masks.masks[n]).any())   # once pruned, still pruned
        assert int((~masks.masks[n]).sum()) == round(0.8 * p.numel())
    # the pruned entries are the smallest by magnitude (pruned ones are 0 now)
    w = masks.params["mlp.fc1.weight"].detach()
    m = masks.masks["mlp.fc1.weight"]
    assert w[m].abs().min() > 0


# ---------------------------------------------------------------- kth_smallest vs kthvalue
N_BIG = FAST_PATH_MIN + 4099   # above the fast-path threshold


def big(kind: str) -> torch.Tensor:
    """random normal; tied (7 distinct values); +-inf (10 % each, the rest normal)."""
    g = torch.Generator().manual_seed(3)
    if kind == "tied":
        return torch.randint(0, 7, (N_BIG,), generator=g).float()
    x = torch.randn(N_BIG, generator=g)
    if kind == "inf":
        perm = torch.randperm(N_BIG, generator=g)
        x[perm[:N_BIG // 10]] = math.inf
        x[perm[N_BIG // 10:N_BIG // 5]] = -math.inf
    return x


KS = (1, 2, N_BIG // 20, N_BIG // 10 + 1, N_BIG // 3, N_BIG // 2, N_BIG - N_BIG // 10,
      N_BIG - 1, N_BIG)


@pytest.fixture(params=["kthvalue", "sort"])
def route(request, monkeypatch):
    """Both ways to a k-th value: torch.kthvalue, and the sort a cuda run takes instead
    (masks.SORT_DEVICES; kthvalue raises there under deterministic algorithms), here on cpu."""
    if request.param == "sort":
        monkeypatch.setattr(masks_module, "SORT_DEVICES", {"cpu", "cuda"})
    return request.param


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize("kind", ["random", "tied", "inf"])
def test_kth_smallest_fast_path_equals_kthvalue(kind):
    """The sampled band finds the exact k-th value (checked against torch.kthvalue) for every
    interior k; at the extremes it may miss, and kth_smallest still answers exactly."""
    flat = big(kind)
    for k in KS:
        expected = torch.kthvalue(flat, k).values
        band = kth_in_band(flat, k)
        if band is not None:
            assert torch.equal(band, expected), (kind, k)
        elif N_BIG // 20 <= k <= N_BIG - N_BIG // 10:
            raise AssertionError(f"{kind}: the band missed the interior k={k}")
        assert torch.equal(kth_smallest(flat, k), expected), (kind, k)


@pytest.mark.usefixtures("route")
@pytest.mark.parametrize("kind", ["random", "tied", "inf"])
def test_kth_smallest_fallback_when_the_band_misses(kind):
    """A sample that lies (every sampled position holds a huge value) gives a band the counts
    reject: kth_in_band says so (None) and kth_smallest falls back to kthvalue on everything."""
    flat = big(kind)
    flat[sample_positions(N_BIG)] = math.inf if kind == "inf" else 1e6
    for k in (N_BIG // 10 + 1, N_BIG // 2, N_BIG - N_BIG // 5):
        assert kth_in_band(flat, k) is None, (kind, k)
        assert torch.equal(kth_smallest(flat, k), torch.kthvalue(flat, k).values), (kind, k)


class Big(Monitored):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # 2^25 entries, only 1000 distinct values: the threshold is a massive tie
        self.weight = nn.Parameter(torch.randint(1, 1001, (2**12, 2**13), generator=g).float())


def test_mask_collapse_2_pow_25_exact_without_quantile(monkeypatch):
    def no_quantile(*a, **k):
        raise AssertionError("torch.quantile used for a threshold")

    for name in ("quantile", "nanquantile"):
        monkeypatch.setattr(torch, name, no_quantile)
        monkeypatch.setattr(torch.Tensor, name, no_quantile)
    model = nn.Module()
    model.big = Big()
    masks = MaskSet(model)
    n = 2**25
    assert masks.params["big.weight"].numel() == n
    pruned = masks.collapse(0.8, "layer")
    assert pruned == round(0.8 * n)
    assert int((masks.params["big.weight"] == 0).sum()) == round(0.8 * n)
    assert int((~masks.masks["big.weight"]).sum()) == round(0.8 * n)


def test_mask_no_quantile_in_source():
    """Thresholds never come from quantile (stats.py's bootstrap intervals may use it)."""
    calls = [f"{f.name}:{i}" for f in [*(PACKAGE / "sparsity").rglob("*.py"), PACKAGE / "training.py"]
             for i, line in enumerate(f.read_text().splitlines(), 1)
             if re.search(r"quantile\s*\(", line)]
    assert not calls, f"quantile call(s): {calls}"


# ---------------------------------------------------------------- surge / rewire
def collapsed_mlp(sparsity: float = 0.8, hidden: int = 256) -> tuple[nn.Module, MaskSet]:
    torch.manual_seed(0)
    model = AutoRegressiveModel(32, context=8, hidden=hidden)
    opt = torch.optim.Adam(model.parameters())
    masks = MaskSet(model, opt)
    masks.collapse(sparsity, "layer")
    return model, masks


@pytest.mark.parametrize("noise_scale", [0.5, 0.1])
def test_mask_surge_random_count_and_scale(noise_scale):
    model, masks = collapsed_mlp()
    old = {n: m.clone() for n, m in masks.masks.items()}
    sigma = {n: float(p.detach()[old[n]].std()) for n, p in masks.params.items()}
    n_pruned = {n: int((~m).sum()) for n, m in old.items()}
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    revived = masks.surge(0.3, "random", noise_scale, torch.Generator().manual_seed(0))
    assert revived == sum(round(0.3 * k) for k in n_pruned.values())
    for n, p in masks.params.items():
        new = masks.masks[n] & ~old[n]
        assert not bool((old[n] & ~masks.masks[n]).any())       # surge prunes nothing
        assert int(new.sum()) == round(0.3 * n_pruned[n])
        values = p.detach()[new]
        target = noise_scale * sigma[n]
        assert target / 2 < float(values.std()) < 2 * target, (n, float(values.std()), target)
        assert abs(float(values.mean())) < 0.2 * target
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p.detach(), biases[n]), "surge touched a bias"


def test_mask_surge_random_is_seeded():
    picks = []
    for _ in range(2):
        _, masks = collapsed_mlp()
        masks.surge(0.2, "random", 0.5, torch.Generator().manual_seed(7))
        picks.append(masks.masks["mlp.fc1.weight"].clone())
    assert torch.equal(*picks)


def test_mask_surge_gradient_picks_largest_grad():
    _, masks = collapsed_mlp()
    g = torch.Generator().manual_seed(1)
    for p in masks.params.values():
        p.grad = torch.randn(p.shape, generator=g)
    old = {n: m.clone() for n, m in masks.masks.items()}
    revived = masks.surge(0.25, "gradient", 0.5)
    assert revived == sum(round(0.25 * int((~m).sum())) for m in old.values())
    for n, p in masks.params.items():
        new = masks.masks[n] & ~old[n]
        still = ~masks.masks[n]
        assert int(new.sum()) == round(0.25 * int((~old[n]).sum()))
        assert p.grad[new].abs().min() >= p.grad[still].abs().max()
        assert torch.all(p.detach()[new] == 0)    # RigL: grown at 0


def test_mask_surge_all_revives_everything_only_masked():
    model, masks = collapsed_mlp()
    n_pruned = sum(int((~m).sum()) for m in masks.masks.values())
    dense = {n: p.detach().clone() for n, p in model.named_parameters()
             if n not in masks.params}
    assert masks.surge(0.1, "all", 0.5, torch.Generator().manual_seed(0)) == n_pruned
    assert all(bool(m.all()) for m in masks.masks.values())
    assert masks.sparsity() == 0.0
    weights = torch.cat([p.detach().reshape(-1) for p in masks.params.values()])
    assert zero_fraction(weights) < 0.01             # revived at noise, not left at 0
    for n, p in model.named_parameters():
        if n in dense:                                # the seed re-noised biases too
            assert torch.equal(p.detach(), dense[n]), n


def test_mask_surge_then_train_revived_entries_learn():
    model = make_model("mlp")
    trainer = make_trainer(model, steps=5)
    trainer.fit()
    trainer.masks.collapse(0.8, "layer")
    before = {n: m.clone() for n, m in trainer.masks.masks.items()}
    trainer.masks.surge(0.5, "random", 0.5, torch.Generator().manual_seed(0))
    revived = {n: trainer.masks.masks[n] & ~before[n] for n in before}
    start = {n: p.detach()[revived[n]].clone() for n, p in trainer.masks.params.items()}
    trainer.cfg.steps = 15
    trainer.fit()
    check_masked(trainer.masks)
    for n, p in trainer.masks.params.items():
        assert bool((p.detach()[revived[n]] != start[n]).any()), n


def test_mask_rewire_keeps_sparsity_constant():
    _, masks = collapsed_mlp(0.6)
    g = torch.Generator().manual_seed(2)
    for p in masks.params.values():
        p.grad = torch.randn(p.shape, generator=g)
    old = {n: m.clone() for n, m in masks.masks.items()}
    weights = {n: p.detach().clone() for n, p in masks.params.items()}
    moved = masks.rewire(0.2)
    assert moved == sum(round(0.2 * int(m.sum())) for m in old.values())
    for n, p in masks.params.items():
        m = masks.masks[n]
        assert int((~m).sum()) == int((~old[n]).sum())
        dropped, grown = old[n] & ~m, m & ~old[n]
        assert int(dropped.sum()) == int(grown.sum()) == round(0.2 * int(old[n].sum()))
        # dropped: the weakest active weights; grown: the largest gradients among pruned
        assert weights[n][dropped].abs().max() <= weights[n][old[n] & m].abs().min()
        assert p.grad[grown].abs().min() >= p.grad[~old[n] & ~m].abs().max()
        assert torch.all(p.detach()[~m] == 0)


def test_mask_regrow_by_gradient_without_gradient_raises():
    """No dense gradient (e.g. called before backward): raise, do not revive the first k."""
    _, masks = collapsed_mlp()
    old = {n: m.clone() for n, m in masks.masks.items()}
    with pytest.raises(ValueError, match="needs a dense gradient"):
        masks.surge(0.25, "gradient", 0.5)
    with pytest.raises(ValueError, match="needs a dense gradient"):
        masks.rewire(0.2)
    assert all(torch.equal(masks.masks[n], old[n]) for n in old)


class Transposed(Monitored):
    """A prunable weight stored transposed: a non-contiguous parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)).t())


@pytest.mark.parametrize("op", ["random", "gradient", "rewire"])
def test_mask_writes_reach_a_non_contiguous_parameter(op):
    """Revived / grown entries land in the parameter and its mask (a write through
    reshape(-1)[idx] goes to a copy and is lost when the tensor is not contiguous)."""
    model = nn.Module()
    model.t = Transposed()
    masks = MaskSet(model)
    p = masks.params["t.weight"]
    assert not p.is_contiguous()
    masks.collapse(0.5, "layer")
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).t().contiguous().t()
    before = masks.masks["t.weight"].clone()
    if op == "rewire":
        assert masks.rewire(0.25) == round(0.25 * int(before.sum()))
        grown = masks.masks["t.weight"] & ~before
        assert int(grown.sum()) == round(0.25 * int(before.sum()))
        assert p.grad[grown].abs().min() >= p.grad[~before & ~masks.masks["t.weight"]].abs().max()
        return
    n = masks.surge(0.5, op, 0.5, torch.Generator().manual_seed(2))
    grown = masks.masks["t.weight"] & ~before
    assert n == int(grown.sum()) == round(0.5 * int((~before).sum()))
    if op == "random":   # revived at noise: every revived entry is non-zero in the parameter
        assert bool((p.detach()[grown] != 0).all())
        assert torch.equal(p.detach() != 0, masks.masks["t.weight"])
    else:                # grown at the largest |grad| among the pruned
        assert p.grad[grown].abs().min() >= p.grad[~masks.masks["t.weight"]].abs().max()


# ---------------------------------------------------------------- schedules via the Trainer
class Recorder:
    """Records mask sparsity after every step."""

    def __init__(self) -> None:
        self.mask_sparsity: dict[int, float] = {}

    def on_step_end(self, trainer, step, metrics):
        self.mask_sparsity[step] = trainer.masks.sparsity()


def run_schedule(steps: int, **surge) -> tuple[Trainer, Recorder]:
    sched = build_schedule(surge_params(**surge), steps, seed=0)
    rec = Recorder()
    trainer = make_trainer(make_model("mlp"), steps, hooks=[sched, rec]).fit()
    return trainer, rec


def test_schedule_dense_never_prunes():
    trainer, rec = run_schedule(20, mode="dense")
    assert trainer.events == [] and not trainer.masks.enabled
    assert set(rec.mask_sparsity.values()) == {0.0}


def test_schedule_interval_never_fires_at_step_0():
    sched = build_schedule(surge_params(), 40, seed=0)
    assert sched.actions(0) == []
    trainer, _ = run_schedule(40)
    assert trainer.events and min(e["step"] for e in trainer.events) == 10


def test_schedule_interval_collapse_then_surge_on_shared_step():
    trainer, rec = run_schedule(40)
    order = [(e["step"], e["rule"]) for e in trainer.events]
    # surge is not run on the last step (it would end training on fresh noise)
    assert order == [(10, "collapse"), (20, "collapse"), (20, "surge"), (30, "collapse"),
                     (40, "collapse")]
    surge = trainer.events[2]
    assert surge["entries"] > 0
    # surge revived 25 % of what the collapse just pruned: 0.5 * (1 - 0.25) = 0.375
    assert abs(surge["sparsity_after"] - 0.375) < 0.01
    assert abs(rec.mask_sparsity[20] - 0.375) < 0.01
    assert abs(rec.mask_sparsity[40] - 0.5) < 0.01
    for e in trainer.events:
        assert {"step", "layer", "rule", "sparsity_before", "sparsity_after", "lr"} <= set(e)
    check_masked(trainer.masks)


def test_schedule_static_fires_once():
    trainer, rec = run_schedule(20, mode="static", target_sparsity=0.7, start_fraction=0.3)
    assert [(e["step"], e["rule"]) for e in trainer.events] == [(6, "collapse")]
    assert rec.mask_sparsity[5] == 0.0
    assert len({rec.mask_sparsity[s] for s in range(6, 21)}) == 1
    for p in trainer.masks.params.values():
        assert abs(zero_fraction(p) - 0.7) <= 1 / p.numel()
    check_masked(trainer.masks)


def test_schedule_rigl_constant_sparsity_and_stops():
    trainer, rec = run_schedule(40, mode="rigl", target_sparsity=0.6, start_fraction=0.25,
                                rigl_every=5, drop_fraction=0.3, rigl_end_fraction=0.75)
    events = [(e["step"], e["rule"]) for e in trainer.events]
    assert events == [(10, "collapse"), (15, "rewire"), (20, "rewire"), (25, "rewire")]
    assert all(e["step"] < 30 for e in trainer.events if e["rule"] == "rewire")
    after = {rec.mask_sparsity[s] for s in range(10, 41)}
    assert len(after) == 1 and abs(after.pop() - 0.6) < 0.01
    moved = [e["entries"] for e in trainer.events[1:]]
    assert moved[0] > moved[1] > moved[2] > 0          # cosine-decayed drop fraction
    frac = [0.3 * (1 + math.cos(math.pi * t / 20)) / 2 for t in (5, 10, 15)]
    active = sum(int(m.sum()) for m in trainer.masks.masks.values())
    for got, f in zip(moved, frac, strict=True):
        assert abs(got - f * active) <= len(trainer.masks.params)
    check_masked(trainer.masks)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_schedule_gradual_follows_the_cubic_ramp(scope):
    """40 steps, ramp 10 %..60 %: t0 = 4, t1 = 24, a pruning step every 3 after t0 (7, ..., 22)
    and t1 itself (off the grid). The expected sparsities are written out here, not taken
    from the schedule: 0.8 * (1 - (1 - (t - 4) / 20)^3)."""
    trainer, rec = run_schedule(40, mode="gradual", target_sparsity=0.8, scope=scope,
                                gradual_start_fraction=0.1, gradual_end_fraction=0.6,
                                gradual_every=3)
    expected = {7: 0.3087, 10: 0.5256, 13: 0.6669, 16: 0.7488, 19: 0.7875, 22: 0.7992,
                24: 0.8}
    assert [(e["step"], e["rule"]) for e in trainer.events] == [(t, "collapse") for t in expected]
    tol = 1 / min(p.numel() for p in trainer.masks.params.values())
    for e in trainer.events:
        assert abs(e["sparsity_after"] - expected[e["step"]]) <= tol, e
        assert e["sparsity_after"] > e["sparsity_before"] and e["layer"] == "all"
    assert all(rec.mask_sparsity[t] == 0.0 for t in range(1, 7))
    assert [rec.mask_sparsity[t] for t in range(24, 41)] == [rec.mask_sparsity[24]] * 17
    total = sum(p.numel() for p in trainer.masks.params.values())
    assert abs(rec.mask_sparsity[24] - 0.8) <= len(trainer.masks.params) / total
    for p in trainer.masks.params.values():  # the weights themselves, not only the masks
        assert scope == "global" or abs(zero_fraction(p) - 0.8) <= 1 / p.numel()
    check_masked(trainer.masks)


@pytest.mark.parametrize("steps,start,end,every", [(100, 0.1, 0.6, 25), (37, 0.0, 0.5, 4),
                                                    (50, 0.2, 1.0, 7), (3, 0.0, 0.1, 5)])
def test_schedule_gradual_fires_only_on_its_grid_and_ends_at_target(steps, start, end, every):
    """No event before t0 or after t1, none off the every-grid except t1; the last is t1 at
    exactly the target (the cube of 0)."""
    sched = build_schedule(surge_params(mode="gradual", target_sparsity=0.9,
                                        gradual_start_fraction=start, gradual_end_fraction=end,
                                        gradual_every=every), steps, seed=0)
    t0, t1 = round(start * steps), max(1, round(end * steps))
    fired = [t for t in range(0, steps + 1) if sched.actions(t)]
    grid = [t for t in range(t0 + every, t1, every)] + [t1]
    assert fired == grid
    assert sched.sparsity_at(t1) == 0.9 and sched.sparsity_at(steps) == 0.9


class OptimizerLr:
    """The lr the optimizer used at each step, read from its param_groups after the step."""

    def __init__(self) -> None:
        self.lr: dict[int, list[float]] = {}

    def on_step_end(self, trainer, step, metrics):
        self.lr[step] = [g["lr"] for g in trainer.optimizer.param_groups]


@pytest.mark.parametrize("mode", ["static", "gradual", "interval", "rigl"])
def test_schedule_event_lr_is_the_lr_the_optimizer_used(mode):
    """Warmup then cosine, so the lr moves every step: an event reporting the previous step's
    lr (or the next's) differs from what the optimizer used at the event's step."""
    sched = build_schedule(surge_params(mode=mode, start_fraction=0.1), 40, seed=0)
    probe = OptimizerLr()
    trainer = make_trainer(make_model("mlp"), 40, hooks=[sched, probe], warmup_steps=12)
    trainer.fit()
    assert trainer.events and any(e["step"] < 12 for e in trainer.events)  # in the warmup too
    for e in trainer.events:
        assert probe.lr[e["step"]] == [e["lr"]], e
