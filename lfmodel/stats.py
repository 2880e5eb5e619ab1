"""The study's statistics: paired bootstrap intervals, Holm correction, verdicts, stability.

Pure functions on numbers and DataFrames (numpy and pandas only): the study reads MLflow runs
into a DataFrame and hands it here. A difference is always arm - baseline, per seed, so the
two runs of a pair share data and init; lower excess loss is better, so a negative difference
is an improvement unless `lower_is_better=False`.

Intervals: DESIGN.md's 95 % percentile bootstrap, and beside it the paired t-interval as a
guard, because the study has 5 to 8 seeds and at those sizes the percentile interval of the
mean is too narrow. Measured on N(0, 1) differences (4,000 repeats x 2,000 resamples): a "95 %"
percentile interval covered 0.84 of the time at 5 seeds and 0.88 at 8. A row's verdict is
"holds" or "opposite" only where both Holm-corrected intervals exclude 0 on that side; where
they disagree it says so. The t-interval is exact for normal differences, so for those a
verdict's error rate is at most its. The studentized bootstrap (bootstrap-t, Efron & Tibshirani
ch. 12), used until 2026-11-25, covered 0.942 / 0.948 on such differences but was dropped: at 5
seeds a resample drawn from near-equal seeds has a tiny se*, which threw its ends far past the
data (on the study's runs: [-12.3, 5.5] for a difference of two mutual informations, each within
[0, ln 4]; [-0.49, 0.52] for five differences all in [-0.45, -0.27]). Five seeds buy little: a
strong effect (per-seed mean / sd = 4.3) got a median p of 0.0027 and up to 0.16 over 50 draws,
so after Holm over ~10 comparisons a claim needs more seeds (8: median 0.0002, max 0.03).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_RESAMPLES = 10_000
LEVEL = 0.95
MIN_PAIRS = 3  # below this a bootstrap of the mean has almost no distinct resamples
SPIKE_WINDOW = 50
SPIKE_K = 6.0
MAD_TO_SD = 1.4826  # MAD * 1.4826 estimates the standard deviation of normal noise
TAIL = 0.2


@dataclass(frozen=True)
class Bootstrap:
    """One paired comparison: the mean difference, its interval at `level`, a two-sided p-value
    that agrees with the interval (p < 1 - level exactly when the interval excludes 0, up to the
    resampling grain), and two readings of "probability of improvement"."""
    n: int
    mean: float
    low: float
    high: float
    level: float
    p: float
    p_improve: float     # share of bootstrap means on the better side of 0 (ties count half)
    share_better: float  # share of seeds where the arm beat its baseline (ties count half)


def _better_share(x: np.ndarray, lower_is_better: bool) -> float:
    better = (x < 0) if lower_is_better else (x > 0)
    return float(better.mean() + 0.5 * (x == 0).mean())


def paired_bootstrap(diff_per_seed: Sequence[float] | np.ndarray, n_resamples: int = N_RESAMPLES,
                     seed: int = 0, level: float = LEVEL,
                     lower_is_better: bool = True) -> Bootstrap:
    """Percentile bootstrap of the mean of per-seed differences (arm - baseline): resample seeds
    with replacement `n_resamples` times from a seeded numpy Generator (same seed, same
    resamples, so an interval recomputed at another level reuses them); the interval is the
    quantiles of mean*, at the outer order statistic (no interpolation), the cautious side.
    p (two-sided, +1 correction so it is never 0): 2 min(P*(mean* <= 0), P*(mean* >= 0)): a
    mean* across 0 is as extreme as "observed 0 under a true mean of `mean`".
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(diff_per_seed, dtype=float)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ValueError("paired_bootstrap needs a 1-D array of finite differences")
    n = len(x)
    if n < MIN_PAIRS:
        return Bootstrap(n, float(x.mean()) if n else math.nan, math.nan, math.nan, level,
                         math.nan, math.nan, _better_share(x, lower_is_better) if n else math.nan)
    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(n)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    means = x[idx].mean(axis=1)
    p_improve = _better_share(means, lower_is_better)
    share = _better_share(x, lower_is_better)
    a = 1 - level
    if se == 0:  # every seed the same difference: no spread to resample
        p = 1.0 if mean == 0 else 2 / (n_resamples + 1)
        return Bootstrap(n, mean, mean, mean, level, p, p_improve, share)
    low = float(np.quantile(means, a / 2, method="lower"))
    high = float(np.quantile(means, 1 - a / 2, method="higher"))
    tail = min((means <= 0).sum(), (means >= 0).sum())
    p = float(min(1.0, 2 * (1 + tail) / (n_resamples + 1)))
    return Bootstrap(n, mean, low, high, level, p, p_improve, share)


def paired_t(diff_per_seed: Sequence[float] | np.ndarray,
             level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, p) of the paired t-interval of the mean difference (two-sided): exact for
    normal differences at any seed count, the guard beside the bootstrap (module docstring).
    NaN under MIN_PAIRS; every seed the same difference gives a zero-width interval."""
    from scipy import stats as sps  # only the report needs it: the stages never import this

    x = np.asarray(diff_per_seed, dtype=float)
    n = len(x)
    if n < MIN_PAIRS:
        return math.nan, math.nan, math.nan
    mean, se = float(x.mean()), float(x.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return mean, mean, 1.0 if mean == 0 else 0.0
    q = float(sps.t.ppf(1 - (1 - level) / 2, n - 1))
    return mean - q * se, mean + q * se, float(2 * sps.t.sf(abs(mean) / se, n - 1))


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values: sort ascending, multiply the i-th (from 0) by m - i,
    carry the running maximum so they never decrease, cap at 1. NaN stays NaN and does not
    count in m."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def holm_alphas(p_values: Sequence[float] | np.ndarray, alpha: float = 1 - LEVEL) -> np.ndarray:
    """The alpha Holm's procedure tests each comparison at: alpha / (m - i) for the i-th
    smallest p (from 0) up to the first comparison it fails to reject; that step's alpha for
    every comparison after it (Holm stops there, so they are judged at the level where it
    stopped). Tied p-values share the first of their steps' alphas (the strictest), so the
    result does not depend on the order the comparisons come in. An interval at level
    1 - alpha_i then excludes 0 exactly where Holm rejects (p_holm < alpha), up to the
    bootstrap's grain: the corrected interval and p_holm tell one story."""
    alpha = round(alpha, 12)  # 1 - 0.95 is 0.05000000000000004: p = alpha / k must not pass
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = len(ok)
    order = ok[np.argsort(p[ok], kind="stable")]
    ranked = p[order]
    step = alpha / (m - np.searchsorted(ranked, ranked, side="left"))  # a tie: its first rank
    failed = np.flatnonzero(ranked >= step)
    if len(failed):
        step[failed[0]:] = step[failed[0]]
    out[order] = step
    return out


def verdict(low: float, high: float, lower_is_better: bool = True) -> str:
    """The issue's rule: "holds" only where the (Holm-corrected) interval excludes 0 on the
    claimed side, "opposite" where it excludes 0 on the other side, otherwise "no effect
    detected" with the interval's width, so a wide interval reads as too few seeds, not as
    evidence of no effect."""
    if math.isnan(low) or math.isnan(high):
        return "too few pairs"
    if low > 0 or high < 0:
        better = high < 0 if lower_is_better else low > 0
        return "holds" if better else "opposite"
    return f"no effect detected (interval width {high - low:.3g})"


def _rows_for(df: pd.DataFrame, group_on: Sequence[str], key: tuple) -> pd.DataFrame:
    """Rows of one group; a NaN in a group column means "every value" (dense models carry no
    target sparsity and sit beside every sparsity)."""
    sel = pd.Series(True, index=df.index)
    for c, v in zip(group_on, key, strict=True):
        sel &= (df[c] == v) | df[c].isna()
    return df[sel]


def _missing(keys_a: set, keys_b: set, arm: str, base: str) -> str:
    fmt = lambda ks: ", ".join(str(k[0] if len(k) == 1 else k) for k in sorted(ks))  # noqa: E731
    parts = [f"{arm} lacks {fmt(keys_b - keys_a)}" if keys_b - keys_a else "",
             f"{base} lacks {fmt(keys_a - keys_b)}" if keys_a - keys_b else ""]
    return "; ".join(p for p in parts if p)


def joint_verdict(boot: str, t: str) -> str:
    """One row's verdict from its two corrected intervals (module docstring): theirs where they
    agree, else "undecided" naming each."""
    short = lambda v: "no effect" if v.startswith("no effect") else v  # noqa: E731
    if short(boot) == short(t):
        return boot
    return f"undecided (bootstrap: {short(boot)}; t-interval: {short(t)})"


def paired_rows(df: pd.DataFrame, metric: str, arm_col: str,
                baseline_of: Mapping[str, str | Sequence[str]],
                pair_on: Sequence[str] = ("seed",),
                group_on: Sequence[str] = ("surge.target_sparsity", "train.steps"),
                lower_is_better: bool = True, n_resamples: int = N_RESAMPLES,
                seed: int = 0) -> pd.DataFrame:
    """Each arm against its baseline within every group (same sparsity and budget), paired on
    `pair_on` (the seeds both have; the others are named in `missing`); uncorrected, for
    holm_family (one call per claim, over every comparison of that claim).

    baseline_of maps arm -> baseline, or arm -> candidates of which the best in that group is
    used, "the best baseline at the same sparsity and budget": the lowest mean metric (highest
    if not lower_is_better) over the seeds it shares with the arm, so that the pick and the
    paired test see the same seeds; among those sharing at least MIN_PAIRS seeds (if none
    does, the row says too few pairs). Columns: the group columns, arm, baseline, n_pairs,
    missing, mean_diff (arm - baseline), ci95_low/high (percentile bootstrap, uncorrected), p,
    t_p (the paired t-test's), p_improve, share_better, and the private _diff, _lower.
    """
    need = [metric, arm_col, *pair_on, *group_on]
    absent = [c for c in need if c not in df.columns]
    if absent:
        raise ValueError(f"paired_rows: columns missing from the runs table: {absent}")
    rows: list[dict] = []
    keys = (list(df[list(group_on)].dropna().drop_duplicates().itertuples(index=False, name=None))
            if group_on else [()])
    pick: Callable = min if lower_is_better else max
    for key in keys:
        sub = _rows_for(df, group_on, key)
        own = set(sub.dropna(subset=list(group_on))[arm_col])  # NaN rows only join as baselines
        present = set(sub[arm_col])
        for arm, cands in baseline_of.items():
            if arm not in own:
                continue
            cands = [cands] if isinstance(cands, str) else list(cands)
            cands = [c for c in cands if c in present and c != arm]
            if not cands:
                continue
            a = _paired(sub, arm_col, arm, metric, pair_on)
            paired = {c: _paired(sub, arm_col, c, metric, pair_on) for c in cands}
            sharing = {c: s.loc[s.index.intersection(a.index)] for c, s in paired.items()}
            sharing = {c: s for c, s in sharing.items() if len(s) >= MIN_PAIRS} or paired
            base = pick(sharing, key=lambda c: sharing[c].mean())
            b = paired[base]
            shared = sorted(set(a.index) & set(b.index))
            diff = (a.loc[shared] - b.loc[shared]).to_numpy(dtype=float)
            boot = paired_bootstrap(diff, n_resamples, seed, LEVEL, lower_is_better)
            rows.append({**dict(zip(group_on, key, strict=True)), "arm": arm, "baseline": base,
                         "n_pairs": boot.n,
                         "missing": _missing({_t(k) for k in a.index}, {_t(k) for k in b.index},
                                             arm, base),
                         "mean_diff": boot.mean, "ci95_low": boot.low, "ci95_high": boot.high,
                         "p": boot.p, "t_p": paired_t(diff)[2], "p_improve": boot.p_improve,
                         "share_better": boot.share_better, "_diff": diff,
                         "_lower": lower_is_better})
    return pd.DataFrame(rows)


CORRECTED = ("p_holm", "ci_level", "ci_low", "ci_high", "t_p_holm", "t_ci_level", "t_ci_low",
             "t_ci_high", "verdict")


def holm_family(rows: pd.DataFrame, level: float = LEVEL, n_resamples: int = N_RESAMPLES,
                seed: int = 0) -> pd.DataFrame:
    """Holm across the rows of paired_rows (every comparison of one claim), for the bootstrap
    and the t-test each: p_holm, ci_level and ci_low/high at the level of the row's Holm step
    (see holm_alphas; the same resamples as paired_rows when n_resamples and seed match), the
    same prefixed t_, and the row's verdict from both corrected intervals (joint_verdict)."""
    if rows.empty:
        return rows
    out = rows.copy()
    for prefix, p_col in (("", "p"), ("t_", "t_p")):
        p = out[p_col].to_numpy(dtype=float)
        alphas = holm_alphas(p, 1 - level)
        ends = []
        for diff, a, lower in zip(out["_diff"], alphas, out["_lower"], strict=True):
            if math.isnan(a):
                ends.append((math.nan, math.nan))
            elif prefix:
                ends.append(paired_t(diff, 1 - a)[:2])
            else:
                b = paired_bootstrap(diff, n_resamples, seed, 1 - a, lower)
                ends.append((b.low, b.high))
        out[prefix + "p_holm"] = holm(p)
        out[prefix + "ci_level"] = 1 - alphas
        out[prefix + "ci_low"] = [lo for lo, _ in ends]
        out[prefix + "ci_high"] = [hi for _, hi in ends]
    out["verdict"] = [joint_verdict(verdict(lo, hi, lower), verdict(tlo, thi, lower))
                      for lo, hi, tlo, thi, lower in zip(out["ci_low"], out["ci_high"],
                                                        out["t_ci_low"], out["t_ci_high"],
                                                        out["_lower"], strict=True)]
    last = [c for c in ("p_improve", "share_better") if c in out.columns]
    first = [c for c in out.columns if c not in (*CORRECTED, *last) and not c.startswith("_")]
    return out[[*first, *CORRECTED, *last]]


def _t(k) -> tuple:
    return k if isinstance(k, tuple) else (k,)


def _paired(df: pd.DataFrame, arm_col: str, arm: str, metric: str,
            pair_on: Sequence[str]) -> pd.Series:
    """The arm's finite metric values indexed by the pairing key; two runs on one key would
    make the pairing ambiguous, so they are an error, not averaged away."""
    s = df[df[arm_col] == arm].set_index(list(pair_on))[metric].astype(float)
    s = s[np.isfinite(s)]
    if s.index.has_duplicates:
        dup = sorted(set(s.index[s.index.duplicated()]))
        raise ValueError(f"paired_rows: arm {arm!r} has several runs for {list(pair_on)} = {dup}")
    return s


# --- stability: what "stabilizes" means, measured per run ---------------------------------

def seed_spread(df: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.DataFrame:
    """Seed-to-seed spread of a final metric per arm: n, mean, std (ddof 1) and range
    (max - min). A method that stabilizes training lands in a narrower band across seeds.
    A NaN in a `by` column is a group of its own (dense arms have no target sparsity)."""
    g = df.dropna(subset=[metric]).groupby(list(by), dropna=False)[metric]
    out = g.agg(n="count", mean="mean", std="std", min="min", max="max")
    out["range"] = out["max"] - out["min"]
    return out.drop(columns=["min", "max"]).reset_index()


def spike_steps(losses: Sequence[float] | np.ndarray, window: int = SPIKE_WINDOW,
                k: float = SPIKE_K) -> np.ndarray:
    """Indices of steps whose loss is far above its running median: loss[t] > median + k * s over
    the `window` steps before t, s the noise's robust standard deviation, estimated from the
    window's step-to-step changes: 1.4826 * MAD(diff) / sqrt(2). Changes, not levels, because
    early in training the loss falls by more than its noise within one window, and the MAD of
    the levels would then measure the trend and hide real spikes. Medians ignore up to half
    the window being spikes, so a burst does not hide itself. k = 6: minibatch noise of the
    training loss is near-normal with a slightly heavy upper tail; 6 sds is far beyond it
    (about 1e-9 per step if normal) while a jump a few times the noise is still counted. The
    trailing median lags above a falling loss, which only makes the count cautious.
    Non-finite losses count as spikes and are left out of the windows. The first `window`
    steps have no full window and are not judged."""
    x = np.asarray(losses, dtype=float)
    if x.ndim != 1 or window < 3:
        raise ValueError("spike_steps needs a 1-D loss curve and window >= 3")
    if len(x) <= window:
        return np.array([], dtype=int)
    clean = np.where(np.isfinite(x), x, np.nan)
    win = np.lib.stride_tricks.sliding_window_view(clean[:-1], window)  # win[i] = x[i:i+window]
    med = np.nanmedian(win, axis=1)
    d = np.diff(win, axis=1)
    with warnings.catch_warnings():  # an all-NaN row (a window of diverged steps) -> NaN, no spike
        warnings.simplefilter("ignore", RuntimeWarning)
        mad = np.nanmedian(np.abs(d - np.nanmedian(d, axis=1)[:, None]), axis=1)
    sd = MAD_TO_SD * mad / math.sqrt(2)  # a change is the difference of two noisy steps
    scale = np.maximum(sd, 1e-8 * np.maximum(1.0, np.abs(med)))  # a flat window: any rise counts
    cur = x[window:]
    spike = ~np.isfinite(cur) | (cur > med + k * scale)
    return np.flatnonzero(spike) + window


def loss_spikes(losses: Sequence[float] | np.ndarray, window: int = SPIKE_WINDOW,
                k: float = SPIKE_K) -> int:
    """Count of loss spikes (see spike_steps): one per step, so a spike lasting 3 steps is 3."""
    return len(spike_steps(losses, window, k))


def val_range_last20(steps: Sequence[int] | np.ndarray, val_losses: Sequence[float] | np.ndarray,
                     total_steps: int | None = None, tail: float = TAIL) -> float:
    """max - min of the validation loss at evaluations in the last `tail` of training
    (step >= (1 - tail) * total_steps; total_steps defaults to the last evaluated step). Unlike
    the variance of the training loss it is not minibatch noise: the validation split is fixed.
    NaN with fewer than two evaluations in the window (one point has no range)."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(val_losses, dtype=float)
    if len(s) != len(v):
        raise ValueError("val_range_last20: steps and val_losses differ in length")
    if len(s) == 0:
        return math.nan
    total = float(s.max()) if total_steps is None else float(total_steps)
    sel = v[s >= (1 - tail) * total]
    return float(sel.max() - sel.min()) if len(sel) >= 2 else math.nan
