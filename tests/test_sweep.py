"""`lfmodel sweep`: grid parsing and names, bad input (one line, exit 2, nothing queued), and a
real local-backend sweep (dvc queue + MLflow SQLite in a temp repo)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import BIN, run

from lfmodel import study, sweep

LFMODEL = str(BIN / "lfmodel")


def test_grid_points_names_and_seeds():
    grid = sweep.Grid({"surge.mode": ["dense", "rigl"], "lambda_entropy": [-0.05, 0.0],
                       "seed": sweep.parse_seeds("0-1")}, {"train.steps": 30})
    pts = grid.points()
    assert len(pts) == 8 and all(p["seed"] == 0 for p in pts[:4])  # seed-major
    names = [grid.name("s1", p) for p in pts]
    assert names[0] == "s1-dense-lm0.05-s0" == study.exp_name("s1", "dense", -0.05, 0)
    assert len(set(names)) == 8
    assert "train.steps=30" in grid.sets(pts[0]) and "lambda_entropy=-0.05" in grid.sets(pts[0])
    assert sweep.parse_axis("lambda_entropy=0,0.01") == ("lambda_entropy", [0, 0.01])
    assert sweep.parse_seeds("0,2,5") == [0, 2, 5]
    other = sweep.Grid({"train.lr": [0.01], "seed": [3]})
    assert other.name("x", other.points()[0]) == "x-lr0.01-s3"


def _bad(repo: Path, *args: str, env: dict | None = None) -> str:
    proc = run([LFMODEL, "sweep", *args], repo, env=env, check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    queued = run(["git", "for-each-ref", "refs/exps"], repo).stdout.strip()
    assert not queued, queued  # nothing queued (DVC's queue keeps its entries under refs/exps)
    return lines[0]


def test_bad_inputs_one_line_exit_2(dvc_repo, tmp_path):
    repo = dvc_repo()
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert "did you mean 'train.steps'" in _bad(repo, "-S", "train.stepz=1,2", "--name", "a", env=store)
    assert "'surge.mode' must be one of" in _bad(repo, "-S", "surge.mode=dense,rgil", env=store)
    assert "empty grid" in _bad(repo, "--name", "a", env=store)
    assert "empty grid" in _bad(repo, "-S", "lambda_entropy=", env=store)
    assert "--seeds" in _bad(repo, "--seeds", "x-y", env=store)
    # a sweep id already used with another grid
    grid = sweep.Grid({"lambda_entropy": [0.0, 0.05]})
    run([str(BIN / "python"), "-c",
                "from lfmodel import sweep, tracking\n"
                "c, e = tracking.get_client('entropy-dynamics')\n"
                f"sweep.parent_run(c, e, 'used', sweep.Grid({grid.axes!r}), 'local')"], repo, env=store)
    line = _bad(repo, "-S", "lambda_entropy=0,0.01", "--name", "used", env=store)
    assert "'used' was already used with another grid" in line
    # --backend ray: SQLite store, then the preconditions in order
    line = _bad(repo, "-S", "seed=1,2", "--backend", "ray", "--address", "127.0.0.1:1", env=store)
    assert "needs an MLflow tracking server" in line and "lfmodel server" in line
    http = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    (repo / "notes.txt").write_text("uncommitted\n")
    assert "dirty" in _bad(repo, "-S", "seed=1,2", "--backend", "ray", "--address", "127.0.0.1:1",
                           env=http)
    (repo / "notes.txt").unlink()
    assert "no git remote 'origin'" in _bad(repo, "-S", "seed=1,2", "--backend", "ray",
                                            "--address", "127.0.0.1:1", env=http)
    bare = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    run(["git", "remote", "add", "origin", str(bare)], repo)
    assert "no default DVC remote" in _bad(repo, "-S", "seed=1,2", "--backend", "ray",
                                           "--address", "127.0.0.1:1", env=http)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvcstore")], repo)
    run(["git", "commit", "-qam", "dvc remote"], repo)
    line = _bad(repo, "-S", "seed=1,2", "--backend", "ray", "--address", "127.0.0.1:1", env=http)
    assert "Ray cluster at 127.0.0.1:1 is not reachable" in line
    assert not run(["git", "ls-remote", str(bare)], repo).stdout.strip()  # nothing pushed


def test_local_backend_small_grid(dvc_repo, tmp_path):
    """2 points through the DVC queue: names as the study's, runs under one parent, resume."""
    repo = dvc_repo()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [LFMODEL, "sweep", "-S", "surge.mode=dense", "-S", "lambda_entropy=0,0.05",
            "--seeds", "0", "--name", "lw", "-j", "2"]
    proc = run(args, repo, env=env, timeout=900)
    assert "results == grid (2 experiments" in proc.stdout, proc.stdout + proc.stderr
    assert "2/2 done, 0 failed" in proc.stdout
    want = {study.exp_name("lw", "dense", lam, 0) for lam in (0.0, 0.05)}
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {e.get("name") for b in shown for e in (b.get("experiments") or [])}
    assert want <= names, names

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("entropy-dynamics")
    parent = client.search_runs([exp.experiment_id], "tags.`lfmodel.sweep.role` = 'parent'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].info.run_id
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
    assert {k.data.tags["dvc.exp_name"] for k in kids} == want
    assert all(sweep.run_complete(k) and k.data.tags["lfmodel.sweep_id"] == "lw" for k in kids)
    arts = {a.path for a in client.list_artifacts(pid)}
    assert {"summary.csv", "summary.md"} <= arts
    # resume by sweep id: nothing left to queue, same result
    again = run(args, repo, env=env, timeout=300)
    assert "2 already complete, queued 0" in again.stdout and "results == grid" in again.stdout
    assert subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True,
                          text=True).stdout.count("/lw-") >= 2
