"""The study report: built from real MLflow runs (SQLite store in tmp), every number traceable."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from lfmodel import study
from lfmodel.tracking import get_client


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _log_grid(study_id: str, experiment: str) -> list[str]:
    """Synthetic runs: adaptive has lower variance; token entropy falls with lambda."""
    client, exp_id = get_client(experiment)
    ids = []
    for mode, lam, seed in itertools.product(["dense", "adaptive"], [-0.05, 0.0, 0.05], [0, 1, 2]):
        run = client.create_run(exp_id, tags={"dvc.exp_name": study.exp_name(study_id, mode, lam,
                                                                             seed)})
        rid = run.info.run_id
        for k, v in {"surge.mode": mode, "lambda_entropy": lam, "seed": seed}.items():
            client.log_param(rid, k, str(v))
        noise = 0.001 * seed
        metrics = {"excess_loss": 0.2 + noise, "sparsity": 0.5 if mode == "adaptive" else 0.0,
                   "token_entropy": 1.0 - 10 * lam + noise, "usage_entropy": 1.3,
                   "expert_regime_nmi": 0.1 + lam + noise,
                   "train_loss_var_last20": (0.001 if mode == "adaptive" else 0.01) + noise / 10}
        for k, v in metrics.items():
            client.log_metric(rid, k, v)
        client.set_tag(rid, "dvc.stage.evaluate", "done")
        client.set_terminated(rid)
        ids.append(rid)
    # a run whose train stage finished but evaluate never ran is listed, not averaged
    partial = client.create_run(exp_id, tags={"dvc.exp_name": study.exp_name(study_id, "dense",
                                                                             0.0, 9)})
    client.log_param(partial.info.run_id, "surge.mode", "dense")
    client.set_terminated(partial.info.run_id)
    ids.append(partial.info.run_id)
    # a run of another study must not leak in
    other = client.create_run(exp_id, tags={"dvc.exp_name": "otherstudy-dense-l0-s0"})
    client.log_param(other.info.run_id, "surge.mode", "dense")
    return ids


def test_study_report_traces_to_runs(store):
    ids = _log_grid("st1", "exp")
    out = study.build_report("st1", "exp")
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(ids)
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 6 and (table["n_seeds"] == 3).all()
    assert (runs["status"] == "INCOMPLETE (FINISHED)").sum() == 1
    dense0 = table[(table["surge.mode"] == "dense") & (table["lambda_entropy"] == 0.0)].iloc[0]
    assert dense0["token_entropy_mean"] == pytest.approx(1.001)
    assert dense0["token_entropy_std"] == pytest.approx(0.001)
    md = (out / "table.md").read_text()
    assert "| dense | 0 | 3 |" in md and "±" in md
    verdict = (out / "verdict.md").read_text()
    assert "adaptive vs dense: train-loss variance" in verdict
    line = next(v for v in verdict.splitlines() if v.startswith("- adaptive vs dense: train-loss"))
    assert "**holds**" in line
    gen = next(v for v in verdict.splitlines() if v.startswith("- adaptive vs dense: excess"))
    assert "no effect" in gen
    assert "strictly decreasing" in verdict
    assert (out / "excess_loss.png").stat().st_size > 0


def test_study_report_without_runs_fails_clearly(store):
    get_client("exp")
    with pytest.raises(SystemExit, match="no MLflow runs"):
        study.build_report("nothing", "exp")


def test_judge_thresholds():
    assert study.judge(-1.0, -1.0) == "holds"
    assert study.judge(1.0, 1.0).startswith("does not hold (opposite")
    assert study.judge(0.01, 0.1).startswith("does not hold (no effect")
    assert study.judge(0.5, 0.5) == "inconclusive"
    assert study.exp_name("s", "rigl", -0.05, 2) == "s-rigl-lm0.05-s2"
