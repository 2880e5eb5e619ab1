"""The study's statistics on synthetic inputs with known answers (issue 13)."""

import math

import numpy as np
import pandas as pd
import pytest

from lfmodel.stats import (
    holm,
    holm_alphas,
    holm_family,
    loss_spikes,
    paired_bootstrap,
    paired_rows,
    paired_t,
    seed_spread,
    spike_steps,
    val_range_last20,
    verdict,
)


def test_shifted_pair_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 0.05, 8)           # seeds differ a lot ...
    arm = base + rng.normal(0.1, 0.02, 8)     # ... the pair differs by 0.1 +- 0.02
    b = paired_bootstrap(arm - base)
    assert b.n == 8 and 0 < b.low < b.mean < b.high
    assert b.low > 0.05 and b.high < 0.15  # about the t-interval, 0.1 +- 2.4 * 0.02 / sqrt(8)
    assert b.p == pytest.approx(2 / 10_001)  # no resample reaches 0: the +1 floor, never 0
    assert b.p_improve == 0.0 and b.share_better == 0.0
    assert verdict(b.low, b.high) == "opposite"
    flip = paired_bootstrap(base - arm)
    assert flip.high < 0 and verdict(flip.low, flip.high) == "holds"
    assert flip.p_improve == 1.0 and flip.share_better == 1.0
    assert paired_bootstrap(arm - base, seed=0) == b  # seeded: same numbers twice


def test_coverage_at_8_seeds_percentile_narrow_t_guard():
    """Identical arms, 8 seeds: the percentile interval covers 0 too rarely at this size (why
    the t-interval stands beside it), the t-interval about 95 %."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 0.02, (2, 400, 8))  # two arms with the same distribution
    cover = lambda lo, hi: lo <= 0 <= hi  # noqa: E731
    pct = np.mean([cover((r := paired_bootstrap(d, seed=i)).low, r.high)
                   for i, d in enumerate(a - b)])
    t = np.mean([cover(*paired_t(d)[:2]) for d in a - b])
    assert 0.83 <= pct <= 0.91 and 0.92 <= t <= 0.98, (pct, t)


def test_paired_t_hand_computed():
    lo, hi, p = paired_t([1, 2, 3, 4, 5])  # mean 3, se sqrt(2.5 / 5), t(0.975, 4) = 2.7764
    assert (lo, hi) == pytest.approx((3 - 2.7764 * 0.5 ** 0.5, 3 + 2.7764 * 0.5 ** 0.5), abs=1e-4)
    assert p == pytest.approx(0.01324, abs=1e-5)  # t = 4.243 on 4 degrees of freedom
    assert math.isnan(paired_t([1.0, 2.0])[0]) and paired_t([0.5] * 4) == (0.5, 0.5, 0.0)


def test_p_value_agrees_with_interval():
    rng = np.random.default_rng(2)
    for i in range(60):
        d = rng.normal(0.01, 0.02, 6)
        r = paired_bootstrap(d, seed=i)
        if r.p < 0.04:
            assert r.low > 0 or r.high < 0
        if r.p > 0.06:
            assert r.low <= 0 <= r.high


def test_bootstrap_edge_cases():
    assert math.isnan(paired_bootstrap([0.1, 0.2]).low)  # too few pairs
    assert verdict(math.nan, math.nan) == "too few pairs"
    same = paired_bootstrap([0.0] * 5)
    assert (same.low, same.high, same.p) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([0.1, math.nan, 0.2])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([0.1, 0.2, 0.3], level=1.0)


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.6, 0.7, 0.01]), [1.0, 1.0, 0.03])  # 1.2 capped at 1
    np.testing.assert_allclose(holm([0.02, math.nan, 0.01]), [0.02, math.nan, 0.02])


def test_holm_alphas_stop_at_first_failure():
    # 0.005 < .05/4, 0.01 < .05/3, 0.03 >= .05/2: Holm stops; 0.04 is judged at .05/2 too
    np.testing.assert_allclose(holm_alphas([0.01, 0.04, 0.03, 0.005]),
                               [0.05 / 3, 0.05 / 2, 0.05 / 2, 0.05 / 4])
    # a stop at the first step keeps every comparison at Bonferroni's alpha / m
    np.testing.assert_allclose(holm_alphas([0.02, 0.03, 0.3]), [0.05 / 3] * 3)
    np.testing.assert_allclose(holm_alphas([0.02, 0.001, 0.3]), [0.05 / 2, 0.05 / 3, 0.05])


def test_holm_alphas_ties_do_not_depend_on_order():
    """Two comparisons with one p: both are judged at the stricter step, in either order (the
    order the runs came from MLflow decided which got alpha / 3 and which alpha / 2)."""
    np.testing.assert_allclose(holm_alphas([0.0008, 0.0008, 0.3]), [0.05 / 3, 0.05 / 3, 0.05])
    np.testing.assert_allclose(holm_alphas([0.3, 0.0008, 0.0008]), [0.05, 0.05 / 3, 0.05 / 3])
    # p exactly alpha / k: Holm does not reject (p_holm = 0.05), so neither may its step
    for p in ([0.01] * 5, [0.0125, 0.0125, 0.0125, 0.0125], [0.025, 0.5]):
        np.testing.assert_array_equal(np.array(p) < holm_alphas(p), holm(p) < 0.05)


def test_undecided_where_bootstrap_and_t_disagree():
    """Two seeds far better, three near 0: the percentile bootstrap excludes 0 (its intervals
    are too narrow at 5 seeds), the t-interval does not; the row says both."""
    diff = np.array([-0.276, 0.0002, -0.0025, -0.284, -0.0055])
    rows = pd.DataFrame([{"arm": "a", "baseline": "b", "p": paired_bootstrap(diff).p,
                          "t_p": paired_t(diff)[2], "_diff": diff, "_lower": True}])
    out = holm_family(rows).iloc[0]
    assert out["ci_high"] < 0 <= out["t_ci_high"]
    assert out["verdict"] == "undecided (bootstrap: holds; t-interval: no effect)"
    clear = rows.assign(_diff=[diff - 0.3], t_p=paired_t(diff - 0.3)[2])
    assert holm_family(clear).iloc[0]["verdict"] == "holds"


def test_best_baseline_on_the_seeds_it_shares():
    """The arm lacks seed 4. Baseline b has the lowest mean over all seeds only because of
    seed 4; on the seeds both share, c is better: c is the best baseline of this comparison.
    d is best of all but shares only 2 seeds (under MIN_PAIRS): a pick that cannot be tested."""
    rows = [("arm", s, 0.10) for s in range(4)]
    rows += [("b", s, v) for s, v in enumerate([0.11, 0.11, 0.11, 0.11, -0.2])]
    rows += [("c", s, 0.105) for s in range(5)] + [("d", s, 0.0) for s in (0, 1)]
    df = pd.DataFrame(rows, columns=["mode", "seed", "excess_loss"])
    out = paired_rows(df, "excess_loss", "mode", {"arm": ["b", "c", "d"]}, group_on=())
    assert out["baseline"].tolist() == ["c"] and out["n_pairs"].tolist() == [4]


def one_family(*args, **kw) -> pd.DataFrame:
    """paired_rows, then holm_family over all of them: one claim's comparisons."""
    return holm_family(paired_rows(*args, **kw), n_resamples=kw.get("n_resamples", 10_000))


def runs_table() -> pd.DataFrame:
    """Seeds differ by 0.1 each (a pairing on anything but the seed is visibly wrong); adaptive
    is 0.05 better than static per seed, rigl 0.02 worse; adaptive lacks seed 0, static seed 6;
    dense has no sparsity (NaN) and sits beside both."""
    rows = []
    for seed in range(7):
        noise = 0.002 * np.sin(seed * 1.7)
        for sp in (0.5, 0.8):
            if seed != 6:
                rows.append(("static", sp, seed, 0.2 + 0.1 * seed + sp))
            rows.append(("rigl", sp, seed, 0.22 + 0.1 * seed + sp + noise))
            if seed != 0:
                rows.append(("adaptive", sp, seed, 0.15 + 0.1 * seed + sp + noise))
        rows.append(("dense", math.nan, seed, 1.5 + 0.1 * seed))
    df = pd.DataFrame(rows, columns=["mode", "sparsity", "seed", "excess_loss"])
    df["steps"] = 1000
    return df


def test_one_family_pairs_on_seed_and_picks_best_baseline():
    out = one_family(runs_table(), "excess_loss", "mode",
                       {"adaptive": ["static", "rigl", "dense"]}, group_on=("sparsity", "steps"),
                       n_resamples=2000)
    assert list(out["sparsity"]) == [0.5, 0.8] and set(out["baseline"]) == {"static"}
    r = out.iloc[0]
    assert r["n_pairs"] == 5 and r["missing"] == "adaptive lacks 0; static lacks 6"
    assert r["mean_diff"] == pytest.approx(-0.05, abs=0.002)
    assert r["ci_low"] < r["ci95_low"] < r["ci95_high"] < r["ci_high"] < 0  # Holm widens
    assert r["ci_level"] == pytest.approx(1 - 0.05 / 2) and r["verdict"] == "holds"
    assert r["p_holm"] == pytest.approx(min(1, 2 * r["p"]))


def test_one_family_dense_joins_every_sparsity_and_reports_opposite():
    out = one_family(runs_table(), "excess_loss", "mode", {"rigl": "static", "static": "dense"},
                       group_on=("sparsity", "steps"), n_resamples=2000)
    assert len(out) == 4 and set(out["arm"]) == {"rigl", "static"}  # dense is never an arm
    rigl = out[out["arm"] == "rigl"]
    assert (rigl["mean_diff"].round(3) == 0.02).all() and (rigl["verdict"] == "opposite").all()
    static = out[out["arm"] == "static"].set_index("sparsity")["mean_diff"]
    assert static[0.5] == pytest.approx(-0.8) and static[0.8] == pytest.approx(-0.5)


def test_one_family_bad_input():
    df = runs_table()
    with pytest.raises(ValueError, match="missing from the runs table"):
        one_family(df, "val_loss", "mode", {"rigl": "static"}, group_on=("sparsity", "steps"))
    with pytest.raises(ValueError, match="several runs"):
        one_family(pd.concat([df, df]), "excess_loss", "mode", {"rigl": "static"},
                     group_on=("sparsity", "steps"))


def test_no_effect_states_width():
    assert verdict(-0.01, 0.03) == "no effect detected (interval width 0.04)"
    assert verdict(0.01, 0.03, lower_is_better=False) == "holds"


def test_seed_spread():
    df = pd.DataFrame({"mode": ["a"] * 3 + ["b"] * 2, "x": [1.0, 2.0, 4.0, 5.0, 5.0]})
    out = seed_spread(df, "x", ["mode"]).set_index("mode")
    assert out.loc["a", "std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert out.loc["a", "range"] == 3.0 and out.loc["b", "range"] == 0.0
    assert list(out["n"]) == [3, 2]


def test_seed_spread_keeps_arms_without_a_target_sparsity():
    """Dense arms carry NaN as their target sparsity: they are a group of their own, not
    dropped (stability.csv lacked dense and adaptive_bare)."""
    df = pd.DataFrame({"arm": ["dense"] * 3 + ["static"] * 3,
                       "target_sparsity": [np.nan] * 3 + [0.5] * 3,
                       "x": [1.0, 2.0, 3.0, 4.0, 4.5, 6.0]})
    out = seed_spread(df, "x", ["arm", "target_sparsity"]).set_index("arm")
    assert list(out.index) == ["dense", "static"]
    assert np.isnan(out.loc["dense", "target_sparsity"])
    assert out.loc["dense", "n"] == 3 and out.loc["dense", "range"] == 2.0


def test_loss_spikes_finds_planted_spikes():
    rng = np.random.default_rng(3)
    steps = np.arange(2000)
    curve = 2.4 + 1.5 * np.exp(-steps / 300) + rng.normal(0, 0.02, len(steps))
    planted = [120, 500, 501, 1333, 1999]
    curve[planted] += 0.3  # 15x the noise
    curve[60] += 0.05      # 2.5x the noise: not far
    assert list(spike_steps(curve)) == planted
    assert loss_spikes(curve) == 5
    curve[700] = math.nan  # a diverged step counts, and does not poison the windows after it
    assert list(spike_steps(curve)) == sorted([*planted, 700])
    flat = np.full(300, 2.0)
    assert loss_spikes(flat) == 0 and loss_spikes(flat[:40]) == 0
    flat[200] = 2.1
    assert list(spike_steps(flat)) == [200]


def test_val_range_last20():
    steps = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    vals = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.49, 2.47, 2.52, 2.46]
    assert val_range_last20(steps, vals) == pytest.approx(2.52 - 2.46)  # steps 800, 900, 1000
    assert val_range_last20(steps, vals, tail=0.5) == pytest.approx(2.6 - 2.46)
    assert math.isnan(val_range_last20([100, 1000], [3.0, 2.5]))  # one point in the window
