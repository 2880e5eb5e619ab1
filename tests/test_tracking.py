"""Issue 4: MLflow tracking under real `dvc` and real MLflow.

One run per pipeline execution with every stage's metrics, params, tags and artifacts; a
second run per `dvc exp run`; four queued experiments at `-j 2` all land in the root store; a
real `mlflow server`; FAILED/KILLED runs; the run-cache decision; `make ui`.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import BIN, make_repo, run

from lfmodel import tracking
from lfmodel.tracking import file_hash

EXPERIMENT = "entropy-dynamics"
# MLflow checks read-only sessions only under pytest (PYTEST_CURRENT_TEST); stages run as users
# run them, without it.
ENV = {"PYTEST_CURRENT_TEST": ""}
# MLflow's own SQLAlchemy deprecation, raised in this process by the client we query with.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")
OVERRIDES = {"surge": {"mode": "interval"}}   # collapse at 10/20/30 and surge at 20: sparsity moves


# ---------------------------------------------------------------- helpers
def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def store_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def all_runs(client) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def numeric_metrics(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def mlflow_noise(text: str) -> list[str]:
    """Log lines, warnings or tracebacks from MLflow / alembic / SQLAlchemy in stage output."""
    return [line for line in text.splitlines()
            if re.search(r"mlflow|alembic|sqlalchemy", line, re.I)
            and re.search(r"\b(INFO|WARNING|WARN|DEBUG|ERROR)\b|Warning|Traceback|site-packages",
                          line)]


def exp_metrics(repo: Path) -> dict[str, dict]:
    """{experiment name: metrics.json + '_rev'} for every experiment `dvc exp show` lists."""
    out = run(["dvc", "exp", "show", "--json"], repo, env=ENV).stdout
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            name, data = node.get("name"), node.get("data")
            if name and isinstance(data, dict):
                metrics = (data.get("metrics") or {}).get("reports/metrics.json", {}).get("data")
                if metrics:
                    found[name] = {**metrics, "_rev": node.get("rev")}
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(out))
    return found


def exp_names(repo: Path) -> set[str]:
    out = run(["dvc", "exp", "list", "--name-only"], repo, env=ENV).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status, resp.read()


def wait_http(url: str, proc: subprocess.Popen, log: Path, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if http_get(url)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"no answer from {url} in {limit}s:\n{log.read_text()}")


def start_server(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",
                                                           "PYTEST_CURRENT_TEST")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (uvicorn workers included), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def check_complete_run(client, run, repo: Path) -> None:
    """Metrics of all three stages, params, tags and artifacts of one pipeline run."""
    from lfmodel.config import flatten, load_params

    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert json.loads((repo / "reports/train/run.json").read_text())["run_id"] == rid
    metrics_json = json.loads((repo / "reports/metrics.json").read_text())
    logged = run.data.metrics

    # train: step histories; sparsity per layer moves (interval mode) over several steps
    assert len({m.step for m in client.get_metric_history(rid, "loss/train")}) > 1
    assert len(client.get_metric_history(rid, "loss/val")) > 1
    layers = [k for k in logged if k.startswith("sparsity/") and k != "sparsity/all"]
    assert len(layers) >= 2, sorted(logged)
    for key in layers:
        hist = client.get_metric_history(rid, key)
        steps = [m.step for m in hist]
        assert len(set(steps)) > 1, key
        assert len(steps) == len(set(steps)), f"{key}: duplicate points {steps}"
        assert max(m.value for m in hist) > 0.3 > min(m.value for m in hist), key
    assert any(k.startswith("entropy/act/") for k in logged)
    assert any(k.startswith("gates/") for k in logged)
    assert logged.get("events/collapse", 0) >= 1 and logged.get("events/surge", 0) >= 1
    # trace
    assert any(k.startswith("trace/") for k in logged), sorted(logged)
    # evaluate: same names and values as metrics.json
    for key, value in numeric_metrics(metrics_json).items():
        assert key in logged, key
        assert logged[key] == pytest.approx(value, rel=1e-6), key

    params = load_params(repo / "params.yaml")
    expected = {k: str(v) for k, v in flatten(params).items()}
    assert run.data.params == expected
    assert run.data.params["surge.mode"] == "interval"

    tags = run.data.tags
    head = run_git(repo, "rev-parse", "HEAD")
    assert tags["git.commit"] == head
    assert tags["params_hash"] == file_hash(repo / "params.yaml")
    assert tags["data_hash"] == file_hash(repo / "data/prepared")
    # MLflow's standard source tags, as mlflow.start_run sets them
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.type"] == "LOCAL"
    assert Path(tags["mlflow.source.name"]).as_posix().endswith("stages/train.py")
    assert tags["mlflow.user"] == getpass.getuser()
    # the prepared data is the run's dataset input, its digest the data hash
    (data_input,) = run.inputs.dataset_inputs
    assert data_input.dataset.digest == tags["data_hash"]
    assert data_input.dataset.name == "regimes" and data_input.dataset.source_type == "local"
    assert {(t.key, t.value) for t in data_input.tags} == {("mlflow.data.context", "train")}
    for stage in ("train", "trace", "evaluate"):
        assert tags[f"dvc.stage.{stage}"] == "done"
    assert {"version.torch", "version.mlflow", "version.dvc"} <= set(tags)

    arts = artifact_paths(client, rid)
    assert {"model/model.safetensors", "model/masks.safetensors", "traces/tokens.parquet",
            "traces/output_by_position.csv", "metrics.json", "train/loss.csv",
            "train/sparsity.csv"} <= arts, sorted(arts)
    assert any(a.startswith("figures/") and a.endswith(".png") for a in arts)
    assert any(re.fullmatch(r"train/sparsity/step_\d{6}\.safetensors", a) for a in arts)


def run_json_at(repo: Path, rev: str) -> str:
    """The run id in reports/train/run.json of a DVC revision (experiment commit)."""
    import dvc.api

    return json.loads(dvc.api.read("reports/train/run.json", repo=str(repo), rev=rev))["run_id"]


def run_git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout.strip()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny project after one `dvc repro` (interval surge-collapse); the default store."""
    repo = make_repo(tmp_path_factory.mktemp("tracking") / "repo", OVERRIDES)
    start = time.monotonic()
    proc = run(["dvc", "repro"], repo, env=ENV)
    print(f"dvc repro: {time.monotonic() - start:.0f}s")
    return {"repo": repo, "output": proc.stdout + proc.stderr}


@pytest.fixture
def pipeline_copy(pipeline, tmp_path):
    """An independent copy of the reproduced project (its own git, DVC cache and store)."""
    dest = tmp_path / "copy"
    shutil.copytree(pipeline["repo"], dest, symlinks=True)
    return dest


# ---------------------------------------------------------------- acceptance
def test_repro_logs_one_complete_run(pipeline):
    repo = pipeline["repo"]
    assert (repo / "mlflow.db").is_file()
    client = client_for(store_uri(repo))
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert exp.artifact_location == (repo / "mlartifacts").as_uri()
    runs = all_runs(client)
    assert len(runs) == 1
    check_complete_run(client, runs[0], repo)
    assert "dvc.exp_name" not in runs[0].data.tags      # plain repro: no experiment name
    head = run_git(repo, "rev-parse", "HEAD")        # ... but a name a person can tell apart
    assert runs[0].info.run_name == f"repro-{head[:7]}-{file_hash(repo / 'params.yaml')[:6]}"
    assert (repo / "mlartifacts" / runs[0].info.run_id / "artifacts/model/model.safetensors").is_file()
    assert not mlflow_noise(pipeline["output"]), pipeline["output"]


def test_exp_run_logs_second_run_tagged_with_exp_name(pipeline):
    repo = pipeline["repo"]
    client = client_for(store_uri(repo))
    before = {r.info.run_id for r in all_runs(client)}
    names_before = exp_names(repo)
    proc = run(["dvc", "exp", "run", "-S", "lambda_entropy=0.05"], repo, env=ENV)
    assert not mlflow_noise(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    (name,) = exp_names(repo) - names_before
    new = [r for r in all_runs(client) if r.info.run_id not in before]
    assert len(new) == 1
    (r,) = new
    assert r.info.status == "FINISHED"
    assert r.data.tags["dvc.exp_name"] == name
    assert r.data.tags["dvc.baseline_rev"] == run_git(repo, "rev-parse", "HEAD")
    assert r.info.run_name == name
    assert float(r.data.params["lambda_entropy"]) == 0.05
    # the experiment's outputs name this run; its metrics are the run's
    shown = exp_metrics(repo)[name]
    assert run_json_at(repo, shown["_rev"]) == r.info.run_id
    assert r.data.metrics["test_loss"] == pytest.approx(shown["test_loss"])
    assert json.loads((repo / "reports/train/run.json").read_text())["run_id"] == r.info.run_id


def test_no_run_cache_entry_is_shared_by_two_experiments(pipeline):
    """Every stage is out of DVC's run cache (a persisted output) or keys on the train run's id
    (reports/train/run.json), so two queue workers never save and restore one entry at once:
    DVC 3.x's restore takes another worker's half-written entry for a corrupted one and deletes
    it, failing that worker's experiment (seen in the tiny study: two arms, one seed, -j 2)."""
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash

    with Repo(str(pipeline["repo"])) as dvc_repo:
        stages = list(dvc_repo.index.stages)
        assert {s.name for s in stages} == {"prepare", "train", "trace", "evaluate"}
        for stage in stages:
            keyed_on_run = any(str(d.def_path) == "reports/train/run.json" for d in stage.deps)
            assert keyed_on_run or not _can_hash(stage), stage.name


def test_run_cache_never_points_metrics_at_a_missing_run(pipeline):
    """train is kept out of DVC's run cache (persisted output); trace/evaluate key on run.json.

    Going back to the first params (`-S lambda_entropy=0.01`) would restore train from the run
    cache if it were cacheable; instead it executes and logs a fresh run. Every metrics.json
    (workspace and each experiment) names a FINISHED run of the store.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash

    repo = pipeline["repo"]
    with Repo(str(repo)) as dvc_repo:
        stages = {s.name: s for s in dvc_repo.index.stages}
        assert not _can_hash(stages["train"])
        assert any(o.persist for o in stages["train"].outs)
        assert any(str(d.def_path) == "reports/train/run.json" for d in stages["trace"].deps)
        assert any(str(d.def_path) == "reports/train/run.json" for d in stages["evaluate"].deps)

    client = client_for(store_uri(repo))
    before = {r.info.run_id for r in all_runs(client)}
    proc = run(["dvc", "exp", "run", "-S", "lambda_entropy=0.01"], repo, env=ENV)
    out = proc.stdout + proc.stderr
    assert "Stage 'train' is cached" not in out, out
    assert "Running stage 'train'" in out
    new = [r for r in all_runs(client) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    ws = json.loads((repo / "reports/metrics.json").read_text())
    assert json.loads((repo / "reports/train/run.json").read_text())["run_id"] == new[0].info.run_id
    assert new[0].data.metrics["test_loss"] == pytest.approx(ws["test_loss"])

    runs = {r.info.run_id: r for r in all_runs(client)}
    shown = exp_metrics(repo)
    assert len(shown) >= 2
    for name, metrics in shown.items():
        rid = run_json_at(repo, metrics["_rev"])
        r = runs.get(rid)
        assert r is not None, f"{name}: reports/train/run.json names run {rid}, not in the store"
        assert r.info.status == "FINISHED", name
        assert r.data.tags["dvc.exp_name"] == name
        assert r.data.metrics["test_loss"] == pytest.approx(metrics["test_loss"]), name


def test_failing_stage_marks_run_failed(pipeline_copy):
    repo = pipeline_copy
    rid = json.loads((repo / "reports/train/run.json").read_text())["run_id"]
    (repo / "data/model/model.safetensors").write_bytes(b"not a safetensors file")
    proc = run(["dvc", "repro", "-s", "trace"], repo, env=ENV, check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    r = client_for(store_uri(repo)).get_run(rid)
    assert r.info.status == "FAILED"
    assert r.info.end_time is not None
    assert r.data.tags["dvc.stage.trace"] == "failed"
    assert r.data.tags["dvc.stage.trace.error"]


def test_sigterm_marks_run_killed(pipeline_copy, tmp_path):
    """DVC stops a stage with a signal (queue kill, Ctrl-C): the run ends KILLED, not RUNNING."""
    repo = pipeline_copy
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(steps=1_000_000, checkpoint_every=1_000_000)
    long_params = tmp_path / "long.yaml"
    long_params.write_text(yaml.safe_dump(params))
    run_file = repo / "reports/train/run.json"
    old = json.loads(run_file.read_text())["run_id"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo),
           "LFMODEL_PARAMS": str(long_params), "PYTEST_CURRENT_TEST": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "python"), "stages/train.py"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        rid = old
        while rid == old and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            rid = json.loads(run_file.read_text())["run_id"]
        assert rid != old, proc.stdout.read() if proc.poll() is not None else "no new run"
        time.sleep(3)       # inside the training loop
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    r = client_for(store_uri(repo)).get_run(rid)
    assert r.info.status == "KILLED", out
    assert r.data.tags["dvc.stage.train"] == "killed"


def test_stage_with_unknown_run_logs_into_new_run(pipeline_copy):
    """run.json names a run the store lacks (store deleted / other machine): the stage logs
    into a new run tagged with the missing id instead of failing."""
    repo = pipeline_copy
    old = json.loads((repo / "reports/train/run.json").read_text())["run_id"]
    (repo / "mlflow.db").unlink()
    proc = run(["python", "stages/evaluate.py"], repo, env=ENV)
    client = client_for(store_uri(repo))
    (r,) = all_runs(client)
    assert r.info.run_id != old and r.info.status == "FINISHED"
    assert r.data.tags["lfmodel.train_run_id"] == old
    lam = yaml.safe_load((repo / "params.yaml").read_text())["lambda_entropy"]
    assert float(r.data.params["lambda_entropy"]) == lam
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert r.data.metrics["test_loss"] == pytest.approx(metrics["test_loss"])
    assert f"MLflow run {old}" in proc.stderr
    assert not mlflow_noise(proc.stdout + proc.stderr), proc.stdout + proc.stderr


def test_queue_four_experiments_two_workers(tmp_path):
    repo = make_repo(tmp_path / "repo", OVERRIDES)
    # prepare once in the baseline so the queued copies check it out instead of rerunning it
    run(["dvc", "repro", "prepare"], repo, env=ENV)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "prepared"], repo)
    lambdas = [0.0, 0.02, 0.05, -0.02]
    for lam in lambdas:
        run(["dvc", "exp", "run", "--queue", "-S", f"lambda_entropy={lam}"], repo, env=ENV)
    start = time.monotonic()
    try:
        run(["dvc", "queue", "start", "-j", "2"], repo, env=ENV)
        deadline = time.monotonic() + 900
        while True:
            status = run(["dvc", "queue", "status"], repo, env=ENV).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                break
            assert time.monotonic() < deadline, status
            time.sleep(5)
        print(f"queue of 4 at -j 2: {time.monotonic() - start:.0f}s")
        assert status.count("Success") == 4, status
    finally:
        # workers stop on their own when idle; make sure before tmp_path goes away
        for _ in range(60):
            status = run(["dvc", "queue", "status"], repo, env=ENV, check=False).stdout
            if re.search(r"Worker status: 0 active, 0 idle", status):
                break
            time.sleep(1)
        else:
            run(["dvc", "queue", "stop"], repo, env=ENV, check=False)

    client = client_for(store_uri(repo))
    runs = all_runs(client)
    assert len(runs) == 4, [(r.info.run_name, r.info.status) for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(float(r.data.params["lambda_entropy"]) for r in runs) == sorted(lambdas)
    for r in runs:
        assert {r.data.tags[f"dvc.stage.{s}"] for s in ("train", "trace", "evaluate")} == {"done"}
        assert "loss/train" in r.data.metrics and "test_loss" in r.data.metrics
    names = exp_names(repo)
    assert len(names) == 4
    assert {r.data.tags["dvc.exp_name"] for r in runs} == names
    by_name = {r.data.tags["dvc.exp_name"]: r for r in runs}
    for name in names:   # the workers raced on a fresh store: still no MLflow chatter
        logs = run(["dvc", "queue", "logs", name], repo, env=ENV).stdout
        assert "Running stage 'evaluate'" in logs, logs
        assert not mlflow_noise(logs), logs
    shown = exp_metrics(repo)
    assert names <= set(shown)
    for name in names:
        assert run_json_at(repo, shown[name]["_rev"]) == by_name[name].info.run_id, name
        assert by_name[name].data.metrics["test_loss"] == pytest.approx(shown[name]["test_loss"])
    # runs went to the parent repo's store, artifacts included; nothing in temp copies
    for r in runs:
        assert r.info.artifact_uri.startswith((repo / "mlartifacts").as_uri())
        assert (repo / "mlartifacts" / r.info.run_id / "artifacts/metrics.json").is_file()


def test_remote_mlflow_server(dvc_repo, tmp_path):
    port = free_port()
    srv = tmp_path / "server"
    srv.mkdir()
    log = tmp_path / "server.log"
    proc = start_server(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{srv / 'mlflow.db'}",
         "--artifacts-destination", str(srv / "artifacts")], srv, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log)
        repo = dvc_repo(OVERRIDES)
        out = run(["dvc", "repro"], repo, env={**ENV, "MLFLOW_TRACKING_URI": url})
        assert not mlflow_noise(out.stdout + out.stderr), out.stdout + out.stderr
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()
        client = client_for(url)
        exp = client.get_experiment_by_name(EXPERIMENT)
        assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
        (r,) = all_runs(client)
        check_complete_run(client, r, repo)
        # artifacts were uploaded through the server into its destination
        assert list((srv / "artifacts").rglob("model.safetensors"))
    finally:
        stop_server(proc)


def test_ui_command_serves_the_stages_store(pipeline):
    """tracking.ui_command (behind `lfmodel ui` and `make ui`) finds the store the stages used:
    from the repo, and from a DVC_ROOT pointing at it; a server URI is refused by name."""
    repo = pipeline["repo"]
    code = ("import json, sys; from lfmodel.tracking import ui_command; "
            "print(json.dumps(ui_command('127.0.0.1', 5000)))")
    args = json.loads(run(["python", "-c", code], repo).stdout)
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    from_dvc = json.loads(run(["python", "-c", code], elsewhere,
                              env={"DVC_ROOT": str(repo), "PYTHONPATH": str(repo)}).stdout)
    assert from_dvc == args
    assert args[1] == "ui" and args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--backend-store-uri") + 1] == store_uri(repo)
    assert args[args.index("--default-artifact-root") + 1] == str(repo / "mlartifacts")
    refused = run(["python", "-c", code], repo, check=False,
                  env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5999"})
    assert refused.returncode != 0 and "http://127.0.0.1:5999" in refused.stderr
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    log = repo.parent / "ui.log"
    proc = start_server(args, repo, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", proc, log)
        status, body = http_get(f"{url}/api/2.0/mlflow/experiments/get-by-name"
                                f"?experiment_name={EXPERIMENT}")
        exp = json.loads(body)["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in exp["tags"]
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert len(json.loads(resp.read())["runs"]) >= 1
        assert http_get(f"{url}/")[0] == 200
    finally:
        stop_server(proc)


def test_dataset_logged_by_a_concurrent_run_is_linked_not_fatal(tmp_path):
    """Two runs of the same data logging it at once: the store's get-or-create of the dataset
    row races, and the loser gets the unique-key error PostgreSQL raised in test_ray_two_nodes.
    log_dataset logs again (and finds the row); any other error still propagates."""
    from mlflow.exceptions import MlflowException

    from lfmodel.tracking import log_dataset

    data = tmp_path / "prepared"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"kind": "tokens", "source": "regimes"}))
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("race")
    real = client.log_inputs

    def lost_race(message: str):
        calls = []

        def log_inputs(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise MlflowException(message)
            return real(*args, **kwargs)
        return log_inputs

    run_id = client.create_run(exp_id).info.run_id
    client.log_inputs = lost_race('(psycopg2.errors.UniqueViolation) duplicate key value '
                                  'violates unique constraint "dataset_pk"')
    log_dataset(client, run_id, data)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["regimes"]
    other = client.create_run(exp_id).info.run_id
    client.log_inputs = lost_race("something else")
    with pytest.raises(MlflowException, match="something else"):
        log_dataset(client, other, data)


@pytest.mark.parametrize("value", [None, ""])
def test_empty_tracking_uri_is_the_default_store(value, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI set but empty means unset, in both readings of it: the default
    SQLite store with its artifact root (not artifacts in the working directory, which a
    queued experiment's temporary copy loses)."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    if value is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", value)
    root = tmp_path.resolve()
    assert tracking.store() == (f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts")


ORPHAN_STAGE = """
import sys, time
from lfmodel.config import load_params
from lfmodel.tracking import stage_run
with stage_run("train", load_params()) as t:
    print(t.run_id, flush=True)
    if sys.argv[1] == "hang":
        time.sleep(600)
"""


def test_rerun_settles_a_run_whose_process_was_killed(tmp_path):
    """A train killed with SIGKILL before its first checkpoint cannot mark its run; the rerun
    (a new run of the same name) marks it KILLED, and leaves a live process's run alone."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "DVC_ROOT": str(tmp_path), "PYTHONPATH": str(repo), **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_EXP_NAME", None)
    cmd = [str(BIN / "python"), "-c", ORPHAN_STAGE]

    def start() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen([*cmd, "hang"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                text=True)
        return proc, proc.stdout.readline().strip()

    killed, killed_id = start()
    alive, alive_id = start()
    try:
        killed.kill()
        killed.wait()
        rerun = subprocess.run([*cmd, "once"], cwd=tmp_path, env=env, capture_output=True,
                               text=True, check=True)
        client = client_for(store_uri(tmp_path.resolve()))
        old = client.get_run(killed_id)
        assert old.info.status == "KILLED"
        assert old.data.tags["lfmodel.orphaned"] == (
            f"process {killed.pid} gone; rerun as {rerun.stdout.strip()}")
        assert client.get_run(alive_id).info.status == "RUNNING"
        assert client.get_run(rerun.stdout.strip()).info.status == "FINISHED"
    finally:
        alive.kill()
        alive.wait()
