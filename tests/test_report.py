"""The study report (lfmodel.report) on synthetic run tables with planted, known answers."""

import warnings

import numpy as np
import pandas as pd
import pytest

from lfmodel import report
from lfmodel.stats import holm, holm_family

SEEDS = list(range(6))
# excess-loss offsets per arm at sparsity 0.8 (static is the best baseline by construction)
OFFSET = {"static": 0.0, "gradual": 0.05, "rigl": 0.05, "small_dense": 0.05,
          "adaptive": 0.1, "interval": 0.0, "seed_dsd": -0.1}


def synthetic_runs(drop: tuple = (), matched: bool = False) -> pd.DataFrame:
    """Seeds differ a lot (sd 0.05), pairs little (sd 0.005): paired tests see the offsets."""
    rng = np.random.default_rng(0)
    seed_eff = rng.normal(0, 0.05, len(SEEDS))
    rows = []

    def add(arm, s, seed, budget=1, lam=0.01, bal=0.0, excess=None, sparsity=None, **extra):
        rows.append({"run_id": f"r{len(rows):03d}", "parent_run_id": "P123", "arm": arm,
                     "target_sparsity": s, "budget": budget, "seed": seed,
                     "lambda_entropy": lam, "lambda_balance": bal,
                     "excess_loss": excess, "sparsity": s if sparsity is None else sparsity,
                     "token_entropy": 0.7, **extra})

    for seed in SEEDS:
        base = 0.2 + seed_eff[seed]
        add("dense", np.nan, seed, excess=base - 0.05 + rng.normal(0, 0.005), sparsity=0.0)
        for arm, off in OFFSET.items():
            if (arm, seed) in drop:
                continue
            add(arm, 0.8, seed, excess=base + off + rng.normal(0, 0.005))
        add("static", 0.5, seed, excess=base - 0.02 + rng.normal(0, 0.005))
        add("adaptive_bare", np.nan, seed, excess=base + rng.normal(0, 0.005),
            sparsity=0.62 + rng.normal(0, 0.01))
        if matched:
            add("static_matched", 0.62, seed, excess=base - 0.05 + rng.normal(0, 0.005))
        for lam in (-0.05, 0.0, 0.01, 0.05):
            for bal in (0.0, 0.1):
                if lam == 0.01 and bal == 0.0:
                    continue  # the dense arm's own run
                mi = 0.1 + (2 * lam if bal else 0.0)  # specialization only with balance on
                add("dense", np.nan, seed, lam=lam, bal=bal, sparsity=0.0,
                    excess=base - 0.05 + rng.normal(0, 0.005),
                    token_entropy=0.7 - 5 * lam + rng.normal(0, 0.01),
                    **{f"block{i}.{m}": v + rng.normal(0, 0.002) for i in (0, 1) for m, v in
                       (("expert_regime_mi", mi), ("expert_token_mi", 0.3),
                        ("usage_entropy", 1.3), ("top_share", 0.3), ("dead_share", 0.0))})
    return pd.DataFrame(rows)


def synthetic_curves(runs: pd.DataFrame, spiky: str) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    parts = []
    for rid in runs["run_id"]:
        step = np.arange(1, 1001)
        loss = 3.0 * np.exp(-step / 300) + 2.4 + rng.normal(0, 0.01, 1000)
        if rid == spiky:
            loss[[300, 600, 900]] += 1.0  # three planted spikes
        val = np.full(1000, np.nan)
        val[99::100] = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.45, 2.5, 2.42, 2.44]
        parts.append(pd.DataFrame({"run_id": rid, "step": step, "train_loss": loss,
                                   "val_loss": val}))
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    runs = synthetic_runs(drop=(("adaptive", 5),))
    out = tmp_path_factory.mktemp("study")
    (out / "old_figure.png").write_bytes(b"from an earlier design")
    spiky = runs[(runs["arm"] == "adaptive") & (runs["seed"] == 0)]["run_id"].item()
    report.build_report(runs, synthetic_curves(runs, spiky), out, wall_s=5400.0, cpu_s=10800.0)
    return runs, out, spiky


def test_planted_effects_give_known_verdicts(built):
    _, out, _ = built
    c = pd.read_csv(out / "comparisons.csv")
    at = lambda claim: c[(c["claim"] == claim) & (c["target_sparsity"] == 0.8)].iloc[0]  # noqa: E731
    assert at("adaptive")["baseline"] == "static"  # the best baseline at 0.8
    assert at("adaptive")["verdict"] == "opposite"  # planted 0.1 worse
    assert at("adaptive")["mean_diff"] == pytest.approx(0.1, abs=0.01)
    assert at("seed_dsd")["verdict"] == "holds"  # planted 0.1 better
    assert at("interval")["verdict"].startswith("no effect detected (interval width")
    # 0.5 has only static: nothing to compare there
    assert set(c[c["claim"] == "adaptive"]["target_sparsity"]) == {0.8}
    v = (out / "verdict.md").read_text()
    assert "adaptive (floor on) vs the best baseline, excess loss: **opposite**" in v
    assert "DSD) vs the best baseline, excess loss: **holds** (measured final sparsity 0.800 " \
        "at target 0.8, 1x (sparse))" in v
    assert "interval surge-collapse vs the best baseline, excess loss: **no effect detected" in v
    assert v.count("## Seed") == 3  # one section per seed claim


def test_stale_files_of_an_earlier_build_are_removed(built):
    _, out, _ = built
    assert not (out / "old_figure.png").exists()
    assert {"runs.csv", "verdict.md", "excess_loss.png"} <= {f.name for f in out.iterdir()}


def test_missing_seed_named_and_everything_traceable(built):
    runs, out, _ = built
    t = pd.read_csv(out / "table.csv", keep_default_na=False)
    row = t[(t["arm"] == "adaptive") & (t["target_sparsity"] == "0.8")].iloc[0]
    assert row["missing_seeds"] == "5" and row["n"] == 5
    assert (t[t["arm"] == "static"]["missing_seeds"] == "").all()
    c = pd.read_csv(out / "comparisons.csv", keep_default_na=False)
    assert c[c["claim"] == "adaptive"]["missing"].iloc[0] == "adaptive lacks 5"
    r = pd.read_csv(out / "runs.csv")
    assert sorted(r["run_id"]) == sorted(runs["run_id"]) and (r["parent_run_id"] == "P123").all()
    lambda_runs = (runs["lambda_entropy"] != 0.01) | (runs["lambda_balance"] != 0)
    assert t["n"].astype(int).sum() == len(runs) - lambda_runs.sum()  # lambda runs apart
    assert t[t["arm"] == "dense"]["n"].astype(int).tolist() == [len(SEEDS)]
    for f in ("table.md", "comparisons.md", "verdict.md", "lambda.md"):
        text = (out / f).read_text()
        assert "parent run(s): P123" in text and "90.0 min" in text and "3.00 CPU-hours" in text
    assert (out / "excess_loss.png").stat().st_size > 0 and (out / "lambda.png").stat().st_size > 0


def test_stability_measures_per_run(built):
    _, out, spiky = built
    r = pd.read_csv(out / "runs.csv").set_index("run_id")
    assert r.loc[spiky, "loss_spikes"] == 3
    assert (r.drop(index=spiky)["loss_spikes"] == 0).all()
    assert r["val_range_last20"].tolist() == pytest.approx([2.5 - 2.42] * len(r))  # steps 800-1000
    s = pd.read_csv(out / "stability.csv")
    assert {"std", "range", "loss_spikes_mean", "val_range_last20_mean"} <= set(s.columns)
    c = pd.read_csv(out / "comparisons.csv")
    assert set(c[c["claim"] == "stability"]["measure"]) == {"loss_spikes", "val_range_last20"}


def test_lambda_substudy(built):
    _, out, _ = built
    c = pd.read_csv(out / "comparisons.csv")
    spec = c[c["claim"] == "specialization"].set_index(["arm", "lambda_balance"])["verdict"]
    assert spec[("lambda=0.05", 0.1)] == "holds" and spec[("lambda=0.01", 0.1)] == "holds"
    assert spec[("lambda=0.05", 0.0)].startswith("no effect detected")
    div = c[c["claim"] == "diversity"]
    assert (div["verdict"] == "holds").all() and len(div) == 2
    lt = pd.read_csv(out / "lambda.csv")
    assert len(lt) == 8 and (lt["n"] == len(SEEDS)).all()
    for col in ("block0.expert_regime_mi_mean", "block1.dead_share_mean", "block1.top_share_std"):
        assert col in lt.columns
    row = lt[(lt["lambda_entropy"] == 0.05) & (lt["lambda_balance"] == 0.1)].iloc[0]
    assert row["block0.expert_regime_mi_mean"] == pytest.approx(0.2, abs=0.003)
    assert report.layer_metric(1, "expert_token_mi") == "block1.expert_token_mi"


def test_bare_controller_matched_or_nearest(tmp_path):
    runs = synthetic_runs()
    main = report.main_runs(runs)
    cmp, note = report.bare_comparison(main, 2000)
    assert "NOT matched" in note and "0.5" in note and cmp["baseline"].iloc[0] == "static"
    assert cmp["mean_diff"].iloc[0] == pytest.approx(0.02, abs=0.006)  # vs static at 0.5
    cmp, note = report.bare_comparison(report.main_runs(synthetic_runs(matched=True)), 2000)
    assert "matched at 0.62" in note and cmp["baseline"].iloc[0] == "static_matched"
    assert holm_family(cmp)["verdict"].iloc[0] == "opposite"  # planted 0.05 worse than matched


def test_claim_verdict_summaries():
    t = lambda *v: pd.DataFrame({"verdict": v, "ci_low": -0.1, "ci_high": 0.2})  # noqa: E731
    assert report.claim_verdict(t("holds", "holds")) == "holds"
    assert report.claim_verdict(t("holds", "no effect detected (x)")).startswith("holds in 1 of 2")
    assert report.claim_verdict(t("holds", "opposite")).startswith("mixed")
    assert report.claim_verdict(t("no effect detected (x)")) == (
        "no effect detected (corrected interval widths 0.3 to 0.3)")
    assert report.claim_verdict(pd.DataFrame()) == "not tested"
    # comparisons without enough pairs are named, not counted as "no effect"
    assert report.claim_verdict(t("holds", "too few pairs")) == (
        "holds in 1 of 2 comparisons, too few pairs in 1")
    assert report.claim_verdict(t("opposite", "no effect detected (x)", "too few pairs")) == (
        "opposite in 1 of 3 comparisons, no effect in 1, too few pairs in 1")
    assert report.claim_verdict(t("too few pairs", "too few pairs")) == "too few pairs"
    few = t("no effect detected (x)", "too few pairs")
    few.loc[1, ["ci_low", "ci_high"]] = np.nan
    assert report.claim_verdict(few) == (
        "no effect detected (corrected interval widths 0.3 to 0.3; too few pairs in 1)")


def test_bad_table_writes_nothing(tmp_path):
    runs = synthetic_runs().drop(columns=["parent_run_id"])
    with pytest.raises(ValueError, match="lacks columns \\['parent_run_id'\\]"):
        report.build_report(runs, out=tmp_path / "s")
    assert not (tmp_path / "s").exists()
    dup = pd.concat([synthetic_runs()] * 2, ignore_index=True)
    with pytest.raises(ValueError, match="several runs for one design point"):
        report.build_report(dup, out=tmp_path / "s")


@pytest.mark.parametrize("n_seeds", [2, 3])
def test_figure_intervals_finite_and_named(n_seeds, tmp_path, monkeypatch):
    """Under 3 seeds the interval is undefined, and a NaN band drew nothing (with matplotlib's
    warnings): the figure shows the seeds' range there and says so."""
    runs = synthetic_runs()
    runs = runs[runs["seed"] < n_seeds]
    assert report._interval(np.array([0.2, 0.7]), 2000) == (0.2, 0.7, False)
    lo, hi, boot = report._interval(np.array([0.2, 0.2, 0.2, 0.5, 0.6]), 2000)
    assert boot and 0.2 <= lo < hi <= 0.6  # tied seeds: bounded (the studentized one was not)
    figs = []
    monkeypatch.setattr(report.plt, "close", figs.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a non-finite band or bar
        report.figures(runs, tmp_path, 2000)
    labels = {t.get_text() for ax in figs[0].axes for t in ax.get_legend().get_texts()}
    ranged = {lab for lab in labels if lab.endswith(" *")}
    assert "dense" in {lab.removesuffix(" *") for lab in labels}
    assert (ranged == labels) if n_seeds == 2 else not ranged
    note = figs[0].get_supxlabel()
    assert note == (report.RANGE_NOTE if n_seeds == 2 else "")
    for ax in figs[0].axes:
        assert np.isfinite(ax.get_ylim()).all()


def test_holm_family_is_the_seed_claim(built):
    """DESIGN.md: Holm across the comparisons of one claim. The seed 002 claim's four
    comparisons (specialization and diversity, two balance settings each) are one family, the
    generalization claim's arms another: p_holm is Holm over the family's p, not a part's."""
    _, out, _ = built
    c = pd.read_csv(out / "comparisons.csv")
    for claims in (["specialization", "diversity"], ["adaptive", "interval", "seed_dsd",
                                                     "adaptive_bare"]):
        fam = c[c["claim"].isin(claims)]
        assert set(fam["claim"]) == set(claims) and len(fam) >= 4
        np.testing.assert_allclose(fam["p_holm"], holm(fam["p"].to_numpy()))
        np.testing.assert_allclose(fam["t_p_holm"], holm(fam["t_p"].to_numpy()))
    assert report.claim_verdict(pd.DataFrame({"verdict": ["opposite", "undecided (x)"]})) == (
        "opposite in 1 of 2 comparisons, undecided in 1")


def test_diverged_runs_named_not_dropped_silently(tmp_path):
    """seed_dsd diverged on seeds 1 and 4: those runs have no metrics, so its mean is over the
    four left; the report must say so in every file's header and in table.csv, not list the
    seeds as merely missing. A group whose every run diverged still gets a row (n = 0)."""
    runs = synthetic_runs(drop=(("seed_dsd", 1), ("seed_dsd", 4), *(("rigl", s) for s in SEEDS)))
    diverged = pd.DataFrame(
        [{"run_id": f"d{seed}", "exp_name": f"x-{arm}-s{seed}", "arm": arm,
          "target_sparsity": 0.8, "budget": 1, "seed": seed, "lambda_entropy": 0.01,
          "lambda_balance": 0.0, "diverged_at_step": 100 + seed}
         for arm, seeds in (("seed_dsd", (1, 4)), ("rigl", SEEDS)) for seed in seeds],
        columns=list(report.DIVERGED_COLS))
    out = tmp_path / "s"
    report.build_report(runs, out=out, n_resamples=500, diverged=diverged)
    table = pd.read_csv(out / "table.csv", dtype={"diverged_seeds": str, "missing_seeds": str})
    row = table[(table["arm"] == "seed_dsd") & (table["target_sparsity"] == 0.8)].iloc[0]
    assert row["n"] == 4 and row["diverged_seeds"] == "1 4" and pd.isna(row["missing_seeds"])
    rigl = table[table["arm"] == "rigl"].iloc[0]
    assert rigl["n"] == 0 and rigl["diverged_seeds"] == " ".join(map(str, SEEDS))
    assert len(pd.read_csv(out / "diverged.csv")) == len(diverged)
    for f in ("table.md", "comparisons.md", "verdict.md", "lambda.md"):
        text = (out / f).read_text()
        assert "**8 run(s) diverged**" in text, f
        assert "seed_dsd at 0.8, 1x: seed 1 (step 101), 4 (step 104)" in text, f


def test_no_divergence_no_note(built):
    _, out, _ = built
    assert "diverged" not in (out / "verdict.md").read_text()
    assert list(pd.read_csv(out / "diverged.csv").columns) == list(report.DIVERGED_COLS)


def test_report_from_runs_csv(built, tmp_path, capsys):
    """`lfmodel study --from-runs`: the same report again from the runs.csv it wrote (the
    stability columns kept, not recomputed without curves), cost.json carried over; a file
    that is not a report's runs.csv is one line, exit 2."""
    import json
    import shutil

    from lfmodel import study

    runs, out, _ = built
    src = tmp_path / "src"
    shutil.copytree(out, src)
    (src / "cost.json").write_text(json.dumps({"wall_s": 5400.0, "cpu_s": 10800.0}))
    again = study.report_from_runs(src / "runs.csv", tmp_path / "again")
    for name in ("comparisons.csv", "stability.csv", "table.csv", "verdict.md", "runs.csv"):
        assert (again / name).read_text() == (out / name).read_text(), name
    assert json.loads((again / "cost.json").read_text())["wall_s"] == 5400.0
    runs.to_csv(tmp_path / "bare.csv", index=False)  # no stability columns
    for arg, msg in ((tmp_path / "bare.csv", "not a runs.csv of a report"),
                     (tmp_path / "nope.csv", "no such file")):
        with pytest.raises(SystemExit) as exit_:
            study.main(["--from-runs", str(arg)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1
