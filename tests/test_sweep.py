"""`lfmodel sweep`: grid parsing and names, bad input (one line, exit 2, nothing queued), and a
real local-backend sweep (dvc queue + MLflow SQLite in a temp repo)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
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
    assert "LFMODEL_PARAMS is set" in _bad(repo, "--seeds", "0-1", env={
        **store, "LFMODEL_PARAMS": str(repo / "params.yaml")})  # every point would refuse it
    assert "-S 'train.lr=[1': not a YAML value (expected ',' or ']'" in _bad(
        repo, "-S", "train.lr=[1", env=store)  # was a yaml traceback
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


def test_queue_failure_is_one_line(dvc_repo, monkeypatch):
    """DVC's and Hydra's errors from in-process queueing end as one line, not a traceback."""
    monkeypatch.chdir(dvc_repo())
    for sets, want in ((["nofile.yaml:x=1"], "Invalid `--set-param` value"),
                       (["seed"], "OverrideParseException: Error parsing override 'seed'")):
        with pytest.raises(sweep.SweepError) as exc:
            sweep.queue(["q"], {"q": sets})
        assert str(exc.value).startswith("queueing q failed: ") and want in str(exc.value)
        assert "\n" not in str(exc.value)


def _parents(uri: str) -> dict[str, str]:
    """{sweep id: status} of the sweeps' parent runs in one MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("entropy-dynamics")
    runs = client.search_runs([exp.experiment_id], "tags.`lfmodel.sweep.role` = 'parent'")
    return {r.data.tags["lfmodel.sweep_id"]: r.info.status for r in runs}


def test_parent_run_settled_when_stopped_early(dvc_repo, tmp_path):
    """A driver stopped by a queueing error (one line, exit 2 like other bad input), Ctrl-C or
    SIGTERM ends its parent run FAILED / KILLED, not RUNNING (a sweep that looks alive)."""
    repo = dvc_repo()
    store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    line = _bad(repo, "-S", "seed=0", "--set", "tracking.experiment=a]b", "--name", "qf", env=store)
    assert "queueing qf-s0 failed: OverrideParseException" in line
    stop = ("import os, signal, sys\nfrom lfmodel import cli, sweep\n"  # the signal while queueing
            "sweep.queue = lambda *a: os.kill(os.getpid(), getattr(signal, sys.argv[1]))\n"
            "cli.main(['sweep', '-S', 'seed=0', '--name', sys.argv[2]])\n")
    codes = {sid: run([str(BIN / "python"), "-c", stop, sig, sid], repo, env=store, check=False,
                      timeout=120).returncode for sig, sid in (("SIGINT", "qi"), ("SIGTERM", "qt"))}
    assert _parents(store["MLFLOW_TRACKING_URI"]) == {"qf": "FAILED", "qi": "KILLED", "qt": "KILLED"}
    assert codes == {"qi": 130, "qt": 130}


def test_resume_runs_dvc_queue_once(dvc_repo, tmp_path, monkeypatch):
    """A driver killed after queueing: the resume does not queue the point again (`--run-all`
    runs every entry, duplicates too), it runs it once; another experiment in DVC's queue is
    refused before anything changes (it would run under this sweep's parent run)."""
    from mlflow.tracking import MlflowClient

    repo = dvc_repo()
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = sweep.Grid({"lambda_entropy": [0]})
    name = grid.name("rq", grid.points()[0])
    sweep.queue(["other", name], {"other": ["seed=7"], name: grid.sets(grid.points()[0])})
    args = [LFMODEL, "sweep", "-S", "lambda_entropy=0", "--name", "rq", "-j", "1"]
    proc = run(args, repo, env={"MLFLOW_TRACKING_URI": uri}, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "outside sweep rq's grid (other)" in proc.stderr
    assert not _parents(uri)  # refused before the parent run
    run(["dvc", "queue", "remove", "other"], repo)
    proc = run(args, repo, env={"MLFLOW_TRACKING_URI": uri}, timeout=300)
    assert "queued 0, 1 already in DVC's queue" in proc.stdout, proc.stdout + proc.stderr
    assert "results == grid (1 experiments" in proc.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("entropy-dynamics")
    runs = client.search_runs([exp.experiment_id], f"tags.`dvc.exp_name` = '{name}'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    assert sum(r.endswith("/" + name) for r in refs) == 1, refs


def test_local_backend_small_grid(dvc_repo, tmp_path):
    """2 points through the DVC queue: names as the study's, runs under one parent, resume.
    One point's experiment cannot be saved (its ref's path blocked by a directory): DVC's queue
    reports success all the same, the sweep marks the run FAILED, lists the point missing
    (exit 1) and runs it again on resume."""
    from mlflow.tracking import MlflowClient

    repo = dvc_repo()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    args = [LFMODEL, "sweep", "-S", "surge.mode=dense", "-S", "lambda_entropy=0,0.05",
            "--seeds", "0", "--name", "lw", "-j", "2"]
    want = {study.exp_name("lw", "dense", lam, 0) for lam in (0.0, 0.05)}
    lost = study.exp_name("lw", "dense", 0.05, 0)
    sha = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    blocker = repo / ".git" / "refs" / "exps" / sha[:2] / sha[2:] / lost
    blocker.mkdir(parents=True)
    (blocker / "keep").touch()  # DVC removes an empty directory in its way
    proc = run(args, repo, env=env, check=False, timeout=900)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{lost} finished but DVC did not save its experiment" in proc.stderr, proc.stderr
    assert f"results != grid: 1 of 2 missing: {lost}" in proc.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("entropy-dynamics")
    runs = client.search_runs([exp.experiment_id], f"tags.`dvc.exp_name` = '{lost}'")
    assert [(r.info.status, r.data.tags.get("lfmodel.unsaved")) for r in runs] == \
        [("FAILED", "no DVC experiment in this repository")]

    (blocker / "keep").unlink()
    blocker.rmdir()
    proc = run(args, repo, env=env, timeout=900)
    assert "1 already complete, queued 1" in proc.stdout, proc.stdout + proc.stderr
    assert "results == grid (2 experiments" in proc.stdout, proc.stdout + proc.stderr
    assert "1/2 done, 0 failed" in proc.stdout and "2/2 done, 0 failed" in proc.stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = {e.get("name") for b in shown for e in (b.get("experiments") or [])}
    assert want <= names, names

    parent = client.search_runs([exp.experiment_id], "tags.`lfmodel.sweep.role` = 'parent'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].info.run_id
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
    done = [k for k in kids if sweep.run_complete(k)]
    assert sorted(k.data.tags["dvc.exp_name"] for k in done) == sorted(want)
    assert all(k.data.tags["lfmodel.sweep_id"] == "lw" for k in done)
    arts = {a.path for a in client.list_artifacts(pid)}
    assert {"summary.csv", "summary.md"} <= arts
    # resume by sweep id: nothing left to queue, same result
    again = run(args, repo, env=env, timeout=300)
    assert "2 already complete, queued 0" in again.stdout and "results == grid" in again.stdout
    assert subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True,
                          text=True).stdout.count("/lw-") == 2


# ---------------------------------------------------------------------------- a real Ray cluster

def _env(extra: dict | None = None) -> dict:
    import os

    from conftest import GIT_ENV

    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra or {})
    return env


def _stop_group(proc: subprocess.Popen, pids: list[int] = ()) -> None:
    """SIGTERM the process group, then SIGKILL it and any extra pids (own sessions)."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_pids(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os_getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def os_getpgid(pid: int) -> int:
    import os

    return os.getpgid(pid)


@pytest.fixture
def tracking_server(tmp_path):
    """`lfmodel server` (PostgreSQL + mlflow server) on a free loopback port; stopped by pid."""
    from lfmodel.server import free_port

    data, port = tmp_path / "server", free_port()
    proc = subprocess.Popen([LFMODEL, "server", "--data", str(data), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export MLFLOW_TRACKING_URI="):
                break
        assert lines and lines[-1].startswith("export"), "".join(lines)
        info = json.loads((data / "server.json").read_text())
        yield {"uri": f"http://127.0.0.1:{port}", "proc": proc, "data": data, "info": info}
    finally:
        pids = []
        if (data / "server.json").exists():
            info = json.loads((data / "server.json").read_text())
            pids = [p for p in (info["mlflow_pid"], info["postgres_pid"]) if p]
        _stop_group(proc)
        for pid in pids:  # children in their own sessions: never outlive the test
            try:
                import os
                import signal

                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def ray_cluster(tmp_path):
    """Two Ray nodes on 127.0.0.1, one CPU each, `ray start --block` in their own process
    groups (head first, then the worker), stopped by group, pass or fail."""
    import time

    from lfmodel.server import RAY_DEFAULT_PORTS, free_port

    port = free_port(avoid=RAY_DEFAULT_PORTS)
    temp = Path(f"/tmp/ray_h3_{port}")
    common = ["--block", "--num-cpus", "1", "--object-store-memory", "80000000",
              "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port),
                             "--include-dashboard", "false", "--temp-dir", str(temp),
                             "--resources", '{"head": 1}', *common],
                            stdout=open(tmp_path / "ray_head.log", "w"), stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)
    nodes = {"head": head}
    try:
        address = f"127.0.0.1:{port}"
        _wait_nodes(address, 1, head)
        worker = subprocess.Popen([str(BIN / "ray"), "start", "--address", address,
                                   "--resources", '{"worker": 1}', *common],
                                  stdout=open(tmp_path / "ray_worker.log", "w"),
                                  stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        nodes["worker"] = worker
        _wait_nodes(address, 2, worker)
        yield {"address": address, **nodes}
    finally:
        for name in ("worker", "head"):
            if name in nodes:
                _stop_group(nodes[name], _group_pids(nodes[name].pid))
        time.sleep(1)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _wait_nodes(address: str, n: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        out = subprocess.run([str(BIN / "ray"), "status", "--address", address],
                             capture_output=True, text=True, env=_env()).stdout
        if out.count(" node_") >= n and f"/{n}.0 CPU" in out:
            return
        time.sleep(2)
    raise AssertionError(f"Ray cluster at {address} did not reach {n} nodes: {out}")


def _cluster_repo(dvc_repo, tmp_path) -> tuple[Path, Path]:
    repo = dvc_repo()
    bare = tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    run(["git", "remote", "add", "origin", str(bare)], repo)
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "dvcstore")], repo)
    run(["git", "commit", "-qam", "remotes"], repo)
    return repo, bare


GRID4 = ["-S", "lambda_entropy=0,0.05", "--seeds", "0-1"]


def _check_records(repo: Path, bare: Path, tmp_path: Path, uri: str, sweep_id: str,
                   n: int = 4) -> dict:
    """origin: exactly n exp refs; a fresh clone pulls and shows them; MLflow: n FINISHED runs
    under one parent with DVC's test_loss. Returns {name: run}."""
    refs = [r for r in run(["git", "ls-remote", str(bare), "refs/exps/*"], repo).stdout.split()
            if r.startswith("refs/exps/")]
    assert len(refs) == n, refs
    clone = tmp_path / "fresh"
    run(["git", "clone", "-q", str(bare), str(clone)], tmp_path)
    names = sorted(r.rsplit("/", 1)[-1] for r in refs)
    run(["dvc", "exp", "pull", "origin", *names], clone)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], clone).stdout)
    exps = {e["name"]: e for b in shown for e in (b.get("experiments") or [])}
    assert set(names) <= set(exps), exps.keys()
    loss = {}
    for n in names:
        data = exps[n]["revs"][0]["data"]
        assert "lambda_entropy" in data["params"]["params.yaml"]["data"]
        loss[n] = data["metrics"]["reports/metrics.json"]["data"]["test_loss"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("entropy-dynamics")
    parents = client.search_runs([exp.experiment_id], f"tags.`lfmodel.sweep_id` = '{sweep_id}' and "
                                 "tags.`lfmodel.sweep.role` = 'parent'")
    assert len(parents) == 1
    kids = client.search_runs([exp.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert sorted(k.data.tags["dvc.exp_name"] for k in finished) == names
    assert all(k.info.status != "RUNNING" for k in kids)
    for k in finished:
        assert k.data.metrics["test_loss"] == pytest.approx(loss[k.data.tags["dvc.exp_name"]],
                                                            rel=1e-6)
    return {k.data.tags["dvc.exp_name"]: k for k in kids}


def test_ray_two_nodes(dvc_repo, tmp_path, tracking_server, ray_cluster):
    repo, bare = _cluster_repo(dvc_repo, tmp_path)
    proc = run([LFMODEL, "sweep", *GRID4, "--name", "rs", "--backend", "ray", "--address",
                ray_cluster["address"]], repo, env={"MLFLOW_TRACKING_URI": tracking_server["uri"]},
               timeout=1200)
    assert "results == grid (4 experiments" in proc.stdout, proc.stdout + proc.stderr
    runs = _check_records(repo, bare, tmp_path, tracking_server["uri"], "rs")
    nodes = {r.data.tags.get("lfmodel.node_id") for r in runs.values()
             if r.info.status == "FINISHED"}
    assert len(nodes) == 2, nodes  # both nodes did work


def test_ray_push_fails_then_resumes(dvc_repo, tmp_path, tracking_server, ray_cluster):
    """A point whose `dvc exp push` fails has a complete MLflow run but no DVC record: the
    sweep reports it missing (exit 1, its run FAILED) and a resume runs it again. The push is
    made to fail by a directory where origin's ref file for that point would go."""
    from mlflow.tracking import MlflowClient

    repo, bare = _cluster_repo(dvc_repo, tmp_path)
    sha = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    blocker = bare / "refs" / "exps" / sha[:2] / sha[2:] / "rp-s1"
    blocker.mkdir(parents=True)
    cmd = [LFMODEL, "sweep", "--seeds", "0-1", "--name", "rp", "--backend", "ray", "--address",
           ray_cluster["address"]]
    env = {"MLFLOW_TRACKING_URI": tracking_server["uri"]}
    proc = run(cmd, repo, env=env, timeout=1200, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "rp-s1 finished but its DVC experiment is not on origin" in proc.stderr, out
    assert "1 of 2 missing: rp-s1" in proc.stderr, out
    assert "dvc exp push origin failed: ERROR" in proc.stderr, out  # not DVC's footer
    client = MlflowClient(tracking_server["uri"])
    exp = client.get_experiment_by_name("entropy-dynamics")
    lost = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` = 'rp-s1'")
    assert [(r.info.status, r.data.tags.get("lfmodel.unsaved") == "no DVC experiment on origin")
            for r in lost] == [("FAILED", True)]

    blocker.rmdir()
    proc = run(cmd, repo, env=env, timeout=1200)
    assert "1 already complete, submitted 1 Ray tasks" in proc.stdout, proc.stdout + proc.stderr
    assert "results == grid (2 experiments" in proc.stdout, proc.stdout + proc.stderr
    _check_records(repo, bare, tmp_path, tracking_server["uri"], "rp", n=2)


def _tree(pgid: int) -> list:
    """Every process of a process group and all their descendants (psutil.Process)."""
    import psutil

    procs = {}
    for pid in _group_pids(pgid):
        try:
            p = psutil.Process(pid)
            procs[pid] = p
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    return list(procs.values())


def test_ray_worker_node_killed(dvc_repo, tmp_path, tracking_server, ray_cluster):
    """SIGKILL the worker node (its processes, by pid) while its task trains: Ray retries the
    task on the head; 4 experiments, 4 FINISHED runs, the killed attempt's run not RUNNING."""
    import re
    import time

    import psutil
    from mlflow.tracking import MlflowClient

    repo, bare = _cluster_repo(dvc_repo, tmp_path)
    worker = ray_cluster["worker"]
    node = next(m.group(1) for p in _tree(worker.pid)
                for m in [re.search(r"--node_id=(\w+)", " ".join(p.cmdline()))] if m)
    env = _env({"MLFLOW_TRACKING_URI": tracking_server["uri"], "PYTHONPATH": str(repo)})
    driver = subprocess.Popen([LFMODEL, "sweep", *GRID4, "--set", "train.steps=300", "--name",
                               "rk", "--backend", "ray", "--address", ray_cluster["address"]],
                              cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        client = MlflowClient(tracking_server["uri"])
        deadline, killed = time.time() + 600, None
        while killed is None and time.time() < deadline and driver.poll() is None:
            exp = client.get_experiment_by_name("entropy-dynamics")
            runs = client.search_runs([exp.experiment_id], f"tags.`lfmodel.node_id` = '{node}' "
                                      "and attributes.status = 'RUNNING'") if exp else []
            if runs:
                killed = runs[0]
                for p in _tree(worker.pid):
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            time.sleep(0.5)
        assert killed is not None, "no task ran on the worker node"
        out, _ = driver.communicate(timeout=1200)
        assert driver.returncode == 0, out
        assert "results == grid (4 experiments" in out, out
    finally:
        _stop_group(driver)
    _check_records(repo, bare, tmp_path, tracking_server["uri"], "rk")  # 4 FINISHED, no dups
    again = client.get_run(killed.info.run_id)
    assert again.info.status in ("FAILED", "KILLED"), again.info.status
