"""The study report (issue 13): reports/study/ from a table of finished runs.

Input `runs`: one row per finished run (lfmodel.study reads them from MLflow):
  run_id, parent_run_id (the sweep's MLflow parent run), arm, target_sparsity (the arm's target,
  NaN for dense and adaptive_bare), budget (multiple of arms.UNIT_STEPS), seed,
  lambda_entropy, lambda_balance, and the metrics of reports/metrics.json (excess_loss,
  sparsity = the measured final sparsity, token_entropy, ...), plus the per-layer columns of
  LAYER_MEASURES for the lambda sub-study.
Input `curves` (optional): long table run_id, step, train_loss, val_loss (val_loss NaN between
  evaluations): reports/train/loss.csv and val.csv of each run, for the stability measures.
Input `diverged` (optional): one row per run that diverged (DIVERGED_COLS). Such a run has no
  final metrics, so it is out of every mean and pairing, which flatters its arm: every file's
  header names them and table.md has a diverged_seeds column.

Writes runs.csv, diverged.csv, table.md/csv, stability.csv, comparisons.md/csv, lambda.md/csv,
verdict.md and figures. Every number is a mean over runs listed in runs.csv by MLflow run id,
under the parent run(s) named in each file's header. Statistics are lfmodel.stats': the
comparisons of one seed claim are one Holm family (DESIGN.md: "Holm across the comparisons of
one claim"); "holds" only where the corrected percentile-bootstrap interval and the corrected
t-interval both exclude 0 on the claimed side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

from lfmodel.arms import BASELINES, SPARSITIES, UNIT_STEPS
from lfmodel.config import DEFAULTS
from lfmodel.evaluation import DEAD_SHARE
from lfmodel.stats import (
    CORRECTED,
    N_RESAMPLES,
    holm_family,
    loss_spikes,
    paired_bootstrap,
    paired_rows,
    seed_spread,
    val_range_last20,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

OUT = Path("reports/study")
REPORT_SUFFIXES = (".csv", ".md", ".png", ".json")  # what build_report (and cost.json) write
METRIC = "excess_loss"
GROUP = ("target_sparsity", "budget")
RUN_KEYS = ("run_id", "parent_run_id", "arm", "target_sparsity", "budget", "seed",
            "lambda_entropy", "lambda_balance")
DIVERGED_COLS = ("run_id", "exp_name", "arm", "target_sparsity", "budget", "seed",
                 "lambda_entropy", "lambda_balance", "diverged_at_step")
# Per-MoE-layer measures of the lambda sub-study: column (and MLflow metric) `block<i>.<key>`,
# the naming evaluate already uses for `block<i>.usage_entropy`. Top expert = argmax of the gate.
LAYER_MEASURES = {
    "expert_regime_mi": "I(top expert; regime), nats",
    "expert_token_mi": "I(top expert; input token), nats",
    "usage_entropy": "usage entropy H(mean_t g_t), nats",
    "top_share": "largest expert's share of tokens (top-1)",
    "dead_share": "share of experts that are top-1 for < 1 % of tokens",
}
DEAD_BELOW = DEAD_SHARE  # an expert is dead below this share of tokens (evaluate computes it)
STABILITY = {"loss_spikes": "loss spikes (count)", "val_range_last20": "val-loss range, last 20 %"}


def layer_metric(layer: int, measure: str) -> str:
    """The column name of one per-layer measure: block<i>.<measure>."""
    if measure not in LAYER_MEASURES:
        raise ValueError(f"unknown layer measure {measure!r}")
    return f"block{layer}.{measure}"


def layer_columns(runs: pd.DataFrame, measure: str) -> list[str]:
    """The block<i>.<measure> columns present, in layer order."""
    cols = [c for c in runs.columns if c.startswith("block") and c.endswith("." + measure)
            and c[5:-len(measure) - 1].isdigit()]
    return sorted(cols, key=lambda c: int(c[5:-len(measure) - 1]))


def check_runs(runs: pd.DataFrame) -> None:
    """One ValueError line naming what is missing."""
    absent = [c for c in (*RUN_KEYS, METRIC, "sparsity") if c not in runs.columns]
    if absent:
        raise ValueError(f"report: the runs table lacks columns {absent}")
    if runs.empty:
        raise ValueError("report: no finished runs")
    dup = runs.duplicated(["arm", "target_sparsity", "budget", "lambda_entropy",
                           "lambda_balance", "seed"])
    if dup.any():
        raise ValueError(f"report: several runs for one design point: "
                         f"{sorted(runs.loc[dup, 'run_id'])}")


def with_stability(runs: pd.DataFrame, curves: pd.DataFrame | None) -> pd.DataFrame:
    """Add loss_spikes (train curve) and val_range_last20 (over the run's own steps) per run.
    Without curves, a table that has them already (a runs.csv this module wrote) keeps them."""
    out = runs.copy()
    if curves is None or curves.empty:
        for col in STABILITY:
            if col not in out.columns:
                out[col] = math.nan
        return out
    out["loss_spikes"], out["val_range_last20"] = math.nan, math.nan
    steps = out.set_index("run_id")["budget"] * UNIT_STEPS
    for rid, c in curves.sort_values("step").groupby("run_id"):
        if rid not in steps.index:
            continue
        i = out.index[out["run_id"] == rid]
        tr = c["train_loss"].dropna()
        out.loc[i, "loss_spikes"] = loss_spikes(tr.to_numpy()) if len(tr) else math.nan
        v = c.dropna(subset=["val_loss"])
        out.loc[i, "val_range_last20"] = val_range_last20(v["step"], v["val_loss"],
                                                          int(steps[rid]))
    return out


def main_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs at the default lambdas (the arms); the others are the lambda sub-study."""
    return runs[(runs["lambda_entropy"] == DEFAULTS["lambda_entropy"])
                & (runs["lambda_balance"] == DEFAULTS["train"]["lambda_balance"])]


def summary(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm x target sparsity x budget: n, mean and seed spread (std) of excess loss, the
    measured sparsity and the stability measures, the seeds that diverged, and the seeds it
    lacks otherwise (against every seed in the table). A group whose every run diverged has
    a row with n = 0."""
    diverged = diverged if diverged is not None else pd.DataFrame(columns=list(DIVERGED_COLS))
    seeds = set(runs["seed"]) | set(diverged["seed"])
    both = runs.assign(_ok=True) if diverged.empty else pd.concat(
        [runs.assign(_ok=True), diverged.assign(_ok=False)], ignore_index=True)
    rows = []
    for key, g in both.groupby(["arm", *GROUP], dropna=False, sort=True):
        row = dict(zip(["arm", *GROUP], key, strict=True))
        ok = g[g["_ok"].astype(bool)]
        row["n"] = len(ok)
        for m in (METRIC, "sparsity", *STABILITY):
            vals = ok[m].astype(float) if m in ok else pd.Series(dtype=float)
            row[f"{m}_mean"], row[f"{m}_std"] = vals.mean(), vals.std(ddof=1)
        lost = set(g.loc[~g["_ok"].astype(bool), "seed"].astype(int))
        row["diverged_seeds"] = " ".join(str(s) for s in sorted(lost))
        row["missing_seeds"] = " ".join(str(s) for s in sorted(seeds - set(ok["seed"]) - lost))
        rows.append(row)
    return pd.DataFrame(rows)


def divergence_note(diverged: pd.DataFrame | None) -> str:
    """One line naming the runs that diverged, for every file's header: they are out of
    every mean and pairing, so the figures of their arm are over the seeds that survived."""
    if diverged is None or diverged.empty:
        return ""
    parts = []
    for key, g in diverged.groupby(["arm", *GROUP, "lambda_entropy", "lambda_balance"],
                                   dropna=False, sort=True):
        arm, target, budget, lam_e, lam_b = key
        where = arm + ("" if pd.isna(target) else f" at {target:g}") + f", {int(budget)}x"
        if (lam_e, lam_b) != (DEFAULTS["lambda_entropy"], DEFAULTS["train"]["lambda_balance"]):
            where += f", lambda_entropy {lam_e:g}, lambda_balance {lam_b:g}"
        at = ", ".join(f"{int(s)} (step {int(t)})" for s, t in
                       sorted(zip(g["seed"], g["diverged_at_step"], strict=True)))
        parts.append(f"{where}: seed {at}")
    return (f"**{len(diverged)} run(s) diverged** (no final metrics, so out of every mean and "
            "pairing: their arm's figures are over the seeds that did not diverge, which "
            "flatters it; diverged.csv): " + "; ".join(parts) + ".\n")


# ---------------------------------------------------------------------------- claims

@dataclass(frozen=True)
class Claim:
    key: str
    seed_claim: str  # the seed document's claim this tests: one Holm family with the others
    text: str        # what is compared
    table: pd.DataFrame  # its comparisons, corrected within the seed claim's family, or empty
    note: str = ""


def _versus_baselines(df: pd.DataFrame, arm: str, metric: str, n_resamples: int,
                      group_on: Sequence[str] = GROUP) -> pd.DataFrame:
    return paired_rows(df, metric, "arm", {arm: list(BASELINES)}, ("seed",), group_on,
                       n_resamples=n_resamples)


def _long(df: pd.DataFrame, metrics: Mapping[str, str]) -> pd.DataFrame:
    """One row per (run, measure): several measures in one paired_rows call."""
    parts = [df.assign(measure=m, value=df[m].astype(float)) for m in metrics if m in df]
    return pd.concat(parts, ignore_index=True) if parts else df.iloc[:0]


def bare_comparison(main: pd.DataFrame, n_resamples: int) -> tuple[pd.DataFrame, str]:
    """adaptive_bare against static at the sparsity it reached: the static_matched runs when
    present, else static at the nearest design sparsity (said in the note). Uncorrected rows
    (paired_rows): claims() corrects them within their family."""
    bare = main[(main["arm"] == "adaptive_bare") & (main["budget"] == 1)]
    if bare.empty:
        return pd.DataFrame(), "no adaptive_bare runs"
    reached = float(bare["sparsity"].mean())
    matched = main[(main["arm"] == "static_matched") & (main["budget"] == 1)]
    if not matched.empty:
        base = matched
        note = (f"bare controller reached sparsity {reached:.3f} (mean over seeds); static "
                f"matched at {matched['target_sparsity'].iloc[0]:g}")
    else:
        static = main[(main["arm"] == "static") & (main["budget"] == 1)]
        if static.empty:
            return pd.DataFrame(), f"bare controller reached {reached:.3f}; no static runs"
        near = min(static["target_sparsity"].unique(), key=lambda s: abs(s - reached))
        base = static[static["target_sparsity"] == near]
        note = (f"bare controller reached sparsity {reached:.3f} (mean over seeds); NOT matched: "
                f"static at the nearest design sparsity {near:g} (run arms.matched_static)")
    df = pd.concat([bare, base], ignore_index=True)
    cmp = paired_rows(df, METRIC, "arm", {"adaptive_bare": list(base["arm"].unique())},
                      ("seed",), (), n_resamples=n_resamples)
    return cmp, note


def _lambda_runs(runs: pd.DataFrame) -> pd.DataFrame:
    lam = runs[(runs["arm"] == "dense") & (runs["budget"] == 1)].copy()
    lam["lam_arm"] = [f"lambda={v:g}" for v in lam["lambda_entropy"]]
    cols = layer_columns(lam, "expert_regime_mi")
    lam["expert_regime_mi_mean"] = lam[cols].mean(axis=1) if cols else math.nan
    return lam


def claims(runs: pd.DataFrame, n_resamples: int = N_RESAMPLES) -> list[Claim]:
    """Every claim's comparisons, Holm-corrected across all the comparisons of its seed claim
    (holm_family over their concatenation; each table keeps its own columns)."""
    main = main_runs(runs)
    s000g = "Seed 000: entropy-adaptive surge-collapse enhances generalization"
    out = []
    for arm, text in (("adaptive", "adaptive (floor on) vs the best baseline, excess loss"),
                      ("interval", "interval surge-collapse vs the best baseline, excess loss"),
                      ("seed_dsd", "the seed's schedule as written (DSD) vs the best baseline, "
                                   "excess loss")):
        ends = main[main["arm"] == arm].groupby(list(GROUP))["sparsity"].mean()
        note = ("" if arm != "seed_dsd" or ends.empty else "measured final sparsity " + ", ".join(
            f"{v:.3f} at target {k[0]:g}, {k[1]}x ({'dense' if v < 0.01 else 'sparse'})"
            for k, v in ends.items()))
        out.append(Claim(arm, s000g, text, _versus_baselines(main, arm, METRIC, n_resamples),
                         note))
    bare, note = bare_comparison(main, n_resamples)
    out.append(Claim("adaptive_bare", s000g, "bare controller (floor off) vs static at the "
                     "sparsity it reached, excess loss", bare, note))
    long = _long(main, STABILITY)
    stab = (paired_rows(long, "value", "arm", {"adaptive": list(BASELINES)}, ("seed",),
                        ("measure", *GROUP), n_resamples=n_resamples)
            if not long.empty and long["value"].notna().any() else pd.DataFrame())
    out.append(Claim("stability", "Seed 000: entropy-adaptive surge-collapse stabilizes training",
                     "adaptive vs the best baseline: loss spikes and val-loss range over the last "
                     "20 % (paired); seed spread in stability.csv", stab,
                     "" if len(stab) else "no training curves given"))
    lam = _lambda_runs(runs)
    s002 = "Seed 002: lambda_entropy steers experts (specialization at > 0, diversity at < 0)"
    has_mi = lam["expert_regime_mi_mean"].notna().any()
    spec = (paired_rows(lam, "expert_regime_mi_mean", "lam_arm",
                        {"lambda=0.01": "lambda=0", "lambda=0.05": "lambda=0"}, ("seed",),
                        ("lambda_balance",), lower_is_better=False, n_resamples=n_resamples)
            if has_mi else pd.DataFrame())
    out.append(Claim("specialization", s002, "lambda > 0 vs 0 on dense: I(top expert; regime), "
                     "nats, mean over layers, per balance setting", spec,
                     "" if has_mi else "not measured: no block<i>.expert_regime_mi columns"))
    div = paired_rows(lam, "token_entropy", "lam_arm", {"lambda=-0.05": "lambda=0"}, ("seed",),
                      ("lambda_balance",), lower_is_better=False, n_resamples=n_resamples)
    out.append(Claim("diversity", s002, "lambda < 0 vs 0 on dense: gate token entropy (higher = "
                     "more experts per token), per balance setting", div))
    return [c for seed_claim in dict.fromkeys(c.seed_claim for c in out)
            for c in _corrected([c for c in out if c.seed_claim == seed_claim], n_resamples)]


def _corrected(family: list[Claim], n_resamples: int) -> list[Claim]:
    """The claims of one seed claim with their rows corrected as one Holm family."""
    tables = [c.table.assign(_claim=i) for i, c in enumerate(family) if len(c.table)]
    if not tables:
        return family
    rows = pd.concat(tables, ignore_index=True)
    done = holm_family(rows, n_resamples=n_resamples)  # drops the private columns
    out = []
    for i, c in enumerate(family):
        own = [col for col in done.columns if col in c.table.columns or col in CORRECTED]
        out.append(replace(c, table=done[rows["_claim"] == i][own].reset_index(drop=True))
                   if len(c.table) else c)
    return out


def claim_verdict(table: pd.DataFrame) -> str:
    """One verdict from a claim's rows: holds / opposite everywhere, in part, mixed, or no
    effect detected with the range of corrected interval widths; rows whose two intervals
    disagree (undecided) and rows without enough pairs are counted apart."""
    if table.empty:
        return "not tested"
    v = table["verdict"]
    m, h, o = len(v), int((v == "holds").sum()), int((v == "opposite").sum())
    few = int((v == "too few pairs").sum())
    und = int(v.str.startswith("undecided").sum())
    if few == m:
        return "too few pairs"
    none = m - h - o - few - und

    def rest(*kinds: str) -> str:
        left = [(k, n) for k, n in (("no effect", none), ("undecided", und),
                                    ("too few pairs", few)) if n and k in kinds]
        if [k for k, _ in left] == ["no effect"]:
            return "no effect in the rest"
        return ", ".join(f"{k} in {n}" for k, n in left)

    if h and o:
        tail = rest("undecided", "too few pairs")
        return f"mixed: holds in {h}, opposite in {o} of {m} comparisons" + (
            f", {tail}" if tail else "")
    for k, word in ((h, "holds"), (o, "opposite"), (und, "undecided")):
        if k:
            others = {"no effect", "undecided", "too few pairs"} - {word}
            return word if k == m else f"{word} in {k} of {m} comparisons, {rest(*others)}"
    w = (table["ci_high"] - table["ci_low"]).dropna()
    return (f"no effect detected (corrected interval widths {w.min():.3g} to {w.max():.3g}"
            + (f"; too few pairs in {few}" if few else "") + ")")


# ---------------------------------------------------------------------------- writing

def _fmt(x: object, digits: int = 4) -> str:
    if isinstance(x, (float, np.floating)):
        return "" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    if df.empty:
        return "(none)\n"
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v, digits) for v in r) + " |"
              for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def lambda_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Lambda sub-study: per (lambda_entropy, lambda_balance) on dense 1x, mean and std over
    seeds of each per-layer measure, the gate token entropy and the excess loss."""
    lam = _lambda_runs(runs)
    cols = [METRIC, "token_entropy",
            *[c for m in LAYER_MEASURES for c in layer_columns(lam, m)]]
    cols = [c for c in dict.fromkeys(cols) if c in lam]
    g = lam.groupby(["lambda_entropy", "lambda_balance"])
    t = g[cols].agg(["mean", "std"])
    t.columns = [f"{c}_{s}" for c, s in t.columns]
    t.insert(0, "n", g.size())
    return t.reset_index()


def _header(runs: pd.DataFrame, wall_s: float | None, cpu_s: float | None) -> str:
    parents = ", ".join(sorted(str(p) for p in runs["parent_run_id"].dropna().unique()))
    cost = []
    if wall_s is not None:
        cost.append(f"wall time {wall_s / 60:.1f} min")
    if cpu_s is not None:
        cost.append(f"{cpu_s / 3600:.2f} CPU-hours")
    return (f"{len(runs)} finished runs, seeds {sorted(int(s) for s in runs['seed'].unique())}; "
            f"MLflow parent run(s): {parents or 'none'}; every run id in runs.csv"
            + (f"; {', '.join(cost)}" if cost else "") + ".\n")


def _interval(values: np.ndarray, n_resamples: int) -> tuple[float, float, bool]:
    """(low, high, is_bootstrap): the 95 % percentile bootstrap interval of the mean, or the
    seeds' range where it is undefined (under MIN_PAIRS seeds). matplotlib cannot draw a NaN
    band or bar: such a band showed nothing."""
    b = paired_bootstrap(values, n_resamples)
    if math.isfinite(b.low) and math.isfinite(b.high):
        return b.low, b.high, True
    return float(values.min()), float(values.max()), False


def _label(arm: str, bootstrap: bool) -> str:
    return arm if bootstrap else f"{arm} *"


RANGE_NOTE = "* the seeds' range where the 95 % interval is undefined (under 3 seeds)"


def figures(runs: pd.DataFrame, out: Path, n_resamples: int) -> None:
    """excess_loss.png (per arm vs target sparsity, 95 % bootstrap interval of the mean, or the
    seeds' range where it is undefined, marked * in the legend; 1x beside 4x; dense as a band;
    the bare controller at its reached sparsity) and lambda.png."""
    main = main_runs(runs)
    budgets = sorted(main["budget"].unique())
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), sharey=True,
                             squeeze=False)
    color = {arm: f"C{i}" for i, arm in enumerate(sorted(set(main["arm"]) - {"dense"}))}
    ranged = False  # some bar or band shows the seeds' range: the footnote says so
    for ax, b in zip(axes[0], budgets, strict=True):
        sub = main[main["budget"] == b]
        arms_here = sorted(set(sub["arm"]) - {"dense"})
        for arm, g in sub.groupby("arm"):
            shift = 0.004 * (arms_here.index(arm) - len(arms_here) / 2) if arm != "dense" else 0
            if arm == "dense":
                lo, hi, boot = _interval(g[METRIC].to_numpy(float), n_resamples)
                ranged |= not boot
                ax.axhspan(lo, hi, color="grey", alpha=0.3, label=_label("dense", boot))
                continue
            if arm == "adaptive_bare":
                x = np.array([g["sparsity"].mean()])
                pts = [g[METRIC].to_numpy(float)]
            else:
                xs = sorted(g["target_sparsity"].dropna().unique())
                x = np.array(xs)
                pts = [g[g["target_sparsity"] == s][METRIC].to_numpy(float) for s in xs]
            means = np.array([p.mean() for p in pts])
            iv = np.array([_interval(p, n_resamples) for p in pts]).reshape(-1, 3)
            ranged |= not iv[:, 2].all()
            ax.errorbar(x + shift, means, yerr=[means - iv[:, 0], iv[:, 1] - means], marker="o",
                        capsize=3, label=_label(arm, iv[:, 2].all()),
                        color=color[arm])  # one color per arm, every panel
        ax.set_title(f"budget {b}x")
        ax.legend(fontsize=7)
        ax.set_xlabel("target sparsity (bare controller: reached; arms side by side)")
        ax.set_xticks(list(SPARSITIES))
    axes[0][0].set_ylabel("excess loss (test - bayes, nats)")
    if ranged:
        fig.supxlabel(RANGE_NOTE, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "excess_loss.png", dpi=110)
    plt.close(fig)

    lam = _lambda_runs(runs)
    measures = [m for m in ("expert_regime_mi", "expert_token_mi") if layer_columns(lam, m)]
    if not measures:
        return
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for ax, m in zip(axes[0], measures, strict=True):
        for col in layer_columns(lam, m):
            for bal, g in lam.groupby("lambda_balance"):
                mean = g.groupby("lambda_entropy")[col].mean()
                ax.plot(mean.index, mean.values, marker="o",
                        label=f"{col.split('.')[0]}, balance {bal:g}")
        ax.set_xlabel("lambda_entropy")
        ax.set_ylabel(LAYER_MEASURES[m])
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lambda.png", dpi=110)
    plt.close(fig)


def build_report(runs: pd.DataFrame, curves: pd.DataFrame | None = None, out: Path = OUT,
                 wall_s: float | None = None, cpu_s: float | None = None,
                 n_resamples: int = N_RESAMPLES, diverged: pd.DataFrame | None = None) -> Path:
    """Write reports/study/ (see the module docstring); returns the folder. Checks the table
    before writing anything. The folder is the report's own: its files from an earlier build
    (a figure an older design made) are removed first, so every file in it is from this one."""
    check_runs(runs)
    order = ["arm", "target_sparsity", "budget", "lambda_entropy", "lambda_balance", "seed"]
    # every table from runs.csv's order, not the store's: a rebuild from it is bit-identical
    runs = with_stability(runs, curves).sort_values(order, ignore_index=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file() and stale.suffix in REPORT_SUFFIXES:
            stale.unlink()
    diverged = diverged if diverged is not None else pd.DataFrame(columns=list(DIVERGED_COLS))
    head = _header(runs, wall_s, cpu_s) + divergence_note(diverged)
    cols = [*RUN_KEYS, *[c for c in runs.columns if c not in RUN_KEYS]]
    runs[cols].to_csv(out / "runs.csv", index=False)
    diverged.sort_values(order)[list(DIVERGED_COLS)].to_csv(out / "diverged.csv", index=False)

    main = main_runs(runs)
    table = summary(main, main_runs(diverged))
    table.to_csv(out / "table.csv", index=False)
    spread = seed_spread(main, METRIC, ["arm", *GROUP]) if len(main) else pd.DataFrame()
    stab = spread.merge(table[["arm", *GROUP, "loss_spikes_mean", "val_range_last20_mean"]],
                        on=["arm", *GROUP], how="left") if len(spread) else spread
    stab.to_csv(out / "stability.csv", index=False)
    (out / "table.md").write_text(
        "# Study: arms at each target sparsity and budget\n\n" + head +
        "\nMean and seed spread (std, ddof 1) over seeds; sparsity is measured from the saved "
        "weights; diverged_seeds: its runs that diverged (no final metrics); missing_seeds: other "
        "seeds other arms have and this one lacks.\n\n" + markdown(table)
        + "\n## Stability\n\nSeed-to-seed spread of the final excess loss (std, range), mean "
        "loss spikes per run, mean val-loss range over the last 20 % of steps.\n\n"
        + markdown(stab))

    cl = claims(runs, n_resamples)
    parts = [c.table.assign(claim=c.key) for c in cl if len(c.table)]
    (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()).to_csv(
        out / "comparisons.csv", index=False)
    md = ["# Comparisons\n", head,
          "Paired per seed (arm - baseline; the best baseline by mean in each group among "
          f"{', '.join(BASELINES)}, over the seeds it shares with the arm); percentile "
          f"bootstrap, {n_resamples} resamples, seeded: ci95 uncorrected, ci_low/high at the "
          "Holm level ci_level; beside it the paired t-test (t_p, t_ci_low/high at its Holm level "
          "t_ci_level), which guards the percentile interval, too narrow at 5 seeds "
          "(lfmodel/stats.py). One Holm family per seed claim (each `##` section of verdict.md). "
          "verdict: holds / opposite where both corrected intervals exclude 0 on that side, "
          "undecided where only one does; p_improve = share of bootstrap means on the better "
          "side.\n"]
    for c in cl:
        md += [f"## {c.key}: {c.text}\n", *([c.note + "\n"] if c.note else []),
               markdown(c.table), f"Verdict: **{claim_verdict(c.table)}**\n"]
    (out / "comparisons.md").write_text("\n".join(md))

    lt = lambda_table(runs)
    lt.to_csv(out / "lambda.csv", index=False)
    (out / "lambda.md").write_text(
        "# Lambda sub-study (dense, 1x)\n\n" + head + "\nPer MoE layer (block<i>.<measure>): "
        + "; ".join(f"{k}: {v}" for k, v in LAYER_MEASURES.items())
        + ". Mean and std over seeds.\n\n" + markdown(lt))

    v = ["# Verdicts\n", head,
         "A comparison holds only where its Holm-corrected 95 % intervals, the percentile "
         "bootstrap's and the paired t-test's, both exclude 0 on the claimed side (\"opposite\": "
         "both on the other side; \"undecided\": only one does); otherwise \"no effect "
         "detected\" with the interval widths (a wide interval means too few seeds, not "
         "evidence of no effect). The comparisons under one heading are one Holm family. "
         "Details in comparisons.md.\n"]
    for seed_claim in dict.fromkeys(c.seed_claim for c in cl):
        v.append(f"## {seed_claim}\n")
        v += [f"- {c.text}: **{claim_verdict(c.table)}**" + (f" ({c.note})" if c.note else "")
              for c in cl if c.seed_claim == seed_claim]
        v.append("")
    (out / "verdict.md").write_text("\n".join(v))
    figures(runs, out, n_resamples)
    return out
