"""The study design (lfmodel.arms): sizes, pairing, names, small-dense sizing, trimming."""

from collections import Counter

import pytest

from lfmodel import arms
from lfmodel.config import DEFAULTS, ParamsError, validate


def _raw(p: arms.Point) -> dict:
    raw: dict = {}
    for k, v in p.overrides:
        node = raw
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return raw


@pytest.mark.parametrize("s", arms.SPARSITIES)
def test_small_dense_count_close_to_target(one_thread, s):
    from lfmodel.models import build_model, prunable, weight

    sd = arms.small_dense_dims(s)
    full = arms.prunable_count(DEFAULTS["model"], 32)
    model = build_model({**DEFAULTS["model"], **{k.split(".")[1]: v for k, v in
                                                 sd.overrides.items()}}, 32)
    count = sum(weight(s).numel() for g in prunable(model).values() for s in g.values())
    assert count == sd.count  # the count is the built model's, independently recounted
    assert sd.ratio == pytest.approx(count / full)
    assert abs(count / full - (1 - s)) < 0.02 * (1 - s)  # within 2 % of the target count
    assert sd.d_model < DEFAULTS["model"]["d_model"] and sd.expert_dim <= DEFAULTS["model"]["expert_dim"]


def test_full_design_sizes_and_pairs():
    d = arms.full_design()
    assert d.seeds == list(arms.FULL_SEEDS) and len(d.seeds) >= 5
    per_seed = Counter((p.arm, p.sparsity, p.budget) for p in d.points if p.seed == 0)
    for a in ("static", "gradual", "interval", "rigl", "adaptive", "small_dense"):
        for s in (0.5, 0.8, 0.9):
            assert per_seed[(a, s, 1)] == 1
    assert per_seed[("adaptive_bare", None, 1)] == 1
    at4 = {a for a, s, b in per_seed if b == 4}
    assert at4 == {"dense", *arms.BEST_BASELINES, *arms.SURGE_ARMS}
    assert all(s in (None, arms.BUDGET_SPARSITY) for a, s, b in per_seed if b == 4)
    lam = {(p.lambda_entropy, p.lambda_balance) for p in d.points if p.seed == 0 and p.arm == "dense"
           and p.budget == 1}
    assert lam == {(le, lb) for le in arms.LAMBDAS for lb in (0.0, arms.BALANCE_ON)}
    # 1x: dense + bare + 3 x (small dense + 6 sparse arms); 4x: 6; lambda: 8 minus the shared one
    assert len(d.points) == len(d.seeds) * (2 + 3 * 7 + 6 + 7)
    assert arms.comparable(d) == []
    every = {k: {p.seed for p in d.points if (p.arm, p.sparsity, p.budget, p.lambda_entropy,
                                               p.lambda_balance) == k}
             for k in {(p.arm, p.sparsity, p.budget, p.lambda_entropy, p.lambda_balance)
                       for p in d.points}}
    assert all(s == set(d.seeds) for s in every.values())  # the same seeds in every arm


def test_comparable_names_a_missing_seed():
    d = arms.full_design(seeds=[0, 1, 2])
    cut = d.without(lambda p: p.arm == "rigl" and p.sparsity == 0.9 and p.seed == 2, "test")
    problems = arms.comparable(cut)
    assert len(problems) == 1 and "rigl" in problems[0] and "[0, 1]" in problems[0]


def test_names_deterministic_unique_and_overrides_valid():
    d = arms.full_design(seeds=[0, 1, 2, 3, 4])
    names = d.experiments("st1")
    assert len(names) == len(d.points)
    assert list(arms.full_design(seeds=[0, 1, 2, 3, 4]).experiments("st1")) == list(names)
    assert "st1-adaptive-p0.8-b4x-s3" in names and "st1-dense-b1x-lm0.05-lb0.1-s0" in names
    assert "st1-dense-b1x-s0" in names and "st1-dense-b1x-l0.01-lb0-s0" not in names
    for name, p in names.items():
        assert name.startswith("st1-") and all(c.isalnum() or c in "-." for c in name)
        ov = dict(p.overrides)
        assert ov["seed"] == p.seed and ov["train.steps"] == p.budget * arms.UNIT_STEPS
        validate(_raw(p))  # every override is a real key with a valid value
    with pytest.raises(ParamsError):  # ...and validate does reject a bad one
        validate({"surge": {"gradual_every": 0}})


def test_seed_dsd_and_bare_controller_overrides():
    dsd = dict(arms.arm_overrides("seed_dsd", 0.8))
    assert dsd["surge.mode"] == "interval" and dsd["surge.regrow"] == "all"
    bare = arms.arm_overrides("adaptive_bare")
    assert bare["surge.floor_end_fraction"] == 0 and bare["surge.max_sparsity"] == max(arms.SPARSITIES)
    assert arms.arm_overrides("adaptive", 0.9)["surge.max_sparsity"] == 0.9
    with pytest.raises(ValueError):
        arms.arm_overrides("static")
    m = arms.matched_static(0.4321, [0, 1])
    assert [p.name("x") for p in m.points] == ["x-staticmatched-p0.43-b1x-s0",
                                                "x-staticmatched-p0.43-b1x-s1"]


def test_default_design_fits_budget_and_keeps_pairs():
    cost = arms.RunCost(0.1, 32)
    full = arms.full_design(common={"train.batch_size": 32, "train.threads": 1})
    d, cpu, wall = arms.default_design(0.1, 32)
    assert cpu == pytest.approx(d.cpu_seconds(cost)) and wall <= 90 * 60
    phase2 = [p for p in d.points if p.arm == "adaptive_bare"]  # static_matched, 1x, per seed
    runs = [*d.points, *phase2]
    assert phase2 and cpu == pytest.approx(sum(p.steps * 0.1 + arms.RUN_OVERHEAD_S for p in runs))
    assert wall == pytest.approx(cpu / 2 + arms.QUEUE_S * len(runs) + arms.STUDY_FIXED_S)
    assert arms.comparable(d) == []
    assert len(d.seeds) >= arms.MIN_SEEDS and set(d.points) <= set(full.points)
    # greedy but not wasteful: undoing the last cut would not fit
    assert any("dropped seed" in n for n in d.notes)
    top = max(full.seeds[len(d.seeds):][:1] or [None])
    if top is not None:
        back = [p for p in full.points if p.seed == top
                and any((q.arm, q.sparsity, q.budget, q.lambda_entropy) ==
                        (p.arm, p.sparsity, p.budget, p.lambda_entropy) for q in d.points)]
        assert wall + sum(cost.run_seconds(p) / 2 + arms.QUEUE_S for p in back) > 90 * 60
    fast, _, wall_fast = arms.default_design(0.001, 32)  # fast enough: nothing is cut
    assert len(fast.points) == len(full.points) and wall_fast <= 90 * 60
    slow, _, _ = arms.default_design(100.0, 32)
    assert "does not fit" in slow.notes[-2] and len(slow.seeds) == arms.MIN_SEEDS
