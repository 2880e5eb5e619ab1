"""`lfmodel study`: a tiny design end to end through the local sweep backend (real dvc queue,
real MLflow on SQLite in a temp repo), resume by id, --report-only; names and old flags."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from conftest import GIT_ENV, ROOT

from lfmodel import arms, study
from lfmodel.tracking import get_client

EXP = "entropy-dynamics"  # params.yaml's: --report-only reads it there


def _tiny_design(seeds=(0, 1, 2)) -> arms.Design:
    c = {"train.threads": 1}
    return arms.Design(tuple(p for s in seeds for p in (
        arms.point("dense", s, common=c), arms.point("static", s, 0.5, common=c))))


def test_points_names_and_matched_common():
    d = _tiny_design()
    dmap = study.design_map(d, "st")
    pts = study.to_points(dmap, "st", {"train.steps": 20})
    names = [pts.name("st", p) for p in pts.points()]
    assert names == [p.name("st") for p in d.points] == list(dmap)
    sets = pts.sets(pts.points()[1])
    assert "surge.target_sparsity=0.5" in sets and "train.steps=20" in sets  # extra wins
    assert not any(s.startswith("train.steps=1") for s in sets)
    assert dmap["st-static-p0.5-b1x-s2"]["arm"] == "static"
    # a grown list (phase 2) may reuse the id, a changed point may not
    grown = study.to_points({**dmap, **study.design_map(arms.matched_static(0.43, [0]), "st")},
                            "st", {"train.steps": 20})
    assert grown.merged(pts.identity()) is not None and pts.merged(grown.identity()) is not None
    changed = study.to_points(dmap, "st", {"train.steps": 21})
    assert changed.merged(pts.identity()) is None
    assert study.exp_name("s", "rigl", -0.05, 2) == "s-rigl-lm0.05-s2"


def test_calibrate_measures_a_step(one_thread):
    sps = study.calibrate(8, steps=3)
    assert 0 < sps < 5


def test_old_flags_and_bad_input_one_line(capsys, tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for argv in (["--modes", "dense"], ["--seeds", "0", "1"], ["--minutes", "0"], ["--minutes", "nan"],
                 ["--report-only", "--study-id", "nope"]):
        with pytest.raises(SystemExit) as e:
            study.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, (argv, err)
    assert "was replaced" in err[0] or "no MLflow parent run" in err[0]


def test_tiny_study_end_to_end(dvc_repo, tmp_path, monkeypatch, capsys):
    """2 arms x 3 seeds through the DVC queue: runs.csv traces to run ids and the parent run;
    the same id again queues nothing; --report-only rebuilds from MLflow."""
    repo = dvc_repo()
    monkeypatch.chdir(repo)
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    extra = {"train.steps": 20, "train.eval_every": 5}
    missing = study.run_study("tst", _tiny_design(), jobs=2, experiment=EXP, extra=extra)
    assert missing == []
    out = study.write_report("tst", EXP, n_resamples=1000)
    client, exp_id = get_client(EXP)
    parent = study.find_parent(client, exp_id, "tst")
    kids = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(k.info.run_id for k in kids) and len(runs) == 6
    assert set(runs["parent_run_id"]) == {parent}
    assert sorted(zip(runs["arm"], runs["seed"], strict=True)) == sorted(
        (a, s) for a in ("dense", "static") for s in (0, 1, 2))
    assert runs.loc[runs["arm"] == "static", "sparsity"].between(0.45, 0.55).all()
    assert runs.loc[runs["arm"] == "dense", "sparsity"].eq(0).all()
    assert {k.data.tags.get("lfmodel.arm") for k in kids} == {"dense", "static"}
    for f in ("comparisons.md", "verdict.md", "table.md", "cost.json"):
        assert (out / f).stat().st_size > 0, f
    assert parent in (out / "verdict.md").read_text()
    assert "cores x wall" in (out / "cost.json").read_text()
    capsys.readouterr()

    # resume by id: the stored design, nothing new queued, no new runs
    assert study.run_study("tst", None, jobs=2, experiment=EXP, extra=extra) == []
    said = capsys.readouterr().out
    assert "resuming the design stored" in said and "6 already complete, queued 0" in said
    assert len(client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")) == 6

    # --report-only rebuilds reports/study/ from MLflow
    for f in out.iterdir():
        f.unlink()
    capsys.readouterr()
    study.main(["--study-id", "tst", "--report-only"])
    said = capsys.readouterr().out
    assert "\nSeed 000: entropy-adaptive surge-collapse enhances generalization\n" in said, said
    assert "\n- bare controller (floor off) vs static at the sparsity it reached" in said, said
    again = pd.read_csv(out / "runs.csv")
    assert sorted(again["run_id"]) == sorted(runs["run_id"])
    assert (out / "comparisons.md").exists() and (out / "verdict.md").exists()

    # a point that diverged: its complete run deleted, a real train under the parent in its
    # place with the NaN fault. The report names it as diverged, not as a missing seed.
    import os
    import subprocess
    import sys

    name = "tst-static-p0.5-b1x-s2"
    client.delete_run(runs.loc[runs["exp_name"] == name, "run_id"].item())
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_EXP_NAME": name, "LFMODEL_SWEEP_ID": "tst",
           "LFMODEL_PARENT_RUN_ID": parent, "LFMODEL_FAULT_NAN_AT_STEP": "3"}
    for stage in ("prepare", "train"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "non-finite" in proc.stderr, proc.stderr
    study.main(["--study-id", "tst", "--report-only"])
    table = pd.read_csv(out / "table.csv", dtype=str)
    static = table[table["arm"] == "static"].iloc[0]
    assert (static["n"], static["diverged_seeds"]) == ("2", "2"), static
    assert pd.isna(static["missing_seeds"])
    verdict = (out / "verdict.md").read_text()
    assert "**1 run(s) diverged**" in verdict and "static at 0.5, 1x: seed 2 (step 3)" in verdict
    assert len(pd.read_csv(out / "runs.csv")) == 5

    # a resume does not run the diverged point again: it is the arm's result, still missing
    capsys.readouterr()
    assert study.run_study("tst", None, jobs=2, experiment=EXP, extra=extra) == [name]
    said = capsys.readouterr().out
    assert f"1 point(s) diverged before and are not run again (their arm's result, in " \
           f"diverged.csv): {name}" in said, said
    assert "5 already complete, queued 0, 1 skipped" in said, said
    assert len(client.search_runs([exp_id], f"tags.`dvc.exp_name` = '{name}'")) == 1


def test_wall_time_kept_when_killed(tmp_path, monkeypatch):
    """A study's wall time is logged while it runs, so an invocation killed outright still
    counts (it used to be logged only at the end); each invocation counts once, by its last
    value, however many beats it logged."""
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client, exp_id = get_client("wall")
    parent = client.create_run(exp_id).info.run_id
    script = ("import time\nfrom lfmodel import study\nfrom lfmodel.tracking import get_client\n"
              f"c, _ = get_client('wall')\nwith study.timed(c, {parent!r}, 't', 2, every=0.3):\n"
              "    print('in', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "in\n"
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first, cpu, basis = study.cost(client, parent)
    assert 2 < first < 4, first
    assert cpu == pytest.approx(2 * first) and basis.startswith("2 cores x wall")

    t0 = time.time()
    with pytest.raises(KeyboardInterrupt), study.timed(client, parent, "t", 2, every=0.3):
        time.sleep(1.5)
        raise KeyboardInterrupt
    second = time.time() - t0
    beats = client.get_metric_history(parent, "study.wall_s")
    assert len(beats) > 6  # several beats per invocation, each counted once:
    total, _, _ = study.cost(client, parent)
    assert first + 1.5 <= total <= first + second, (total, first, second)
