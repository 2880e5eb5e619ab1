"""MLflow tracking: one run per pipeline execution, shared by train, trace and evaluate.

Where runs go: `MLFLOW_TRACKING_URI` if set; else SQLite at `<repo root>/mlflow.db` with
artifacts in `<repo root>/mlartifacts`. The repo root is `DVC_ROOT` when DVC sets it: for a
queued experiment DVC points it at the parent repo, not the temporary copy it deletes.

`train` creates the run and writes its id to `reports/train/run.json`; later stages reopen it.
Each stage marks the run RUNNING while it works, FINISHED when it returns and FAILED (or
KILLED on SIGTERM / Ctrl-C) when it raises, so no run is left RUNNING by a crash.
Metrics are buffered and sent in batches (async), off the training hot path.

Queue safety: store schema and experiment are created under a file lock (`.mlflow.lock` in the
repo root), so parallel `dvc queue` workers never race on the schema; every call is retried on
SQLite "database is locked" (MLflow also sets a 20 s busy timeout).

DVC run cache (decision): `train` is kept out of the run cache, and so is `prepare` (see
dvc.yaml: queued experiments with the same data share its entry, on which DVC races);
`trace` and `evaluate` are left in it.
What links a DVC result to its MLflow run is `reports/train/run.json` (a train output, so it is
in every experiment's outputs) and, for experiments, the run's `dvc.exp_name` tag.
  * `train` has a `persist: true` output (data/checkpoints), and DVC never saves or restores a
    stage with a persisted output (`dvc/stage/cache.py: _can_hash`). So every time DVC decides
    train must run, it executes and creates a new MLflow run; it is never silently restored
    with a `run.json` naming a run from another execution (or one never made in this store,
    e.g. by a queued experiment whose temporary copy is gone).
  * `trace` and `evaluate` depend on `reports/train/run.json`, whose content is the run id, so
    their run-cache key includes the run id. A restore can only happen for the very run they
    already logged into when they executed; it logs nothing new and needs nothing new.
  * A stage that reopens a run id the current store does not have (store deleted, outputs
    pulled from another machine, `MLFLOW_TRACKING_URI` changed between stages) does not fail
    and does not log into nothing: it starts a new run with the params and tags, tagged
    `lfmodel.train_run_id` (the missing id) and `lfmodel.train_run_missing`, and says so on
    stderr; `tracker.run_id` is the run really logged into.

MLflow's INFO chatter (schema creation/migration) is silenced unless `MLFLOW_LOGGING_LEVEL` is
set, so stage output stays readable under `dvc repro`.

A tracking server that goes away mid-stage (issue 11). MLflow's HTTP client retries a refused
connection for minutes (7 retries, backoff factor 2, 120 s timeout) and then a traceback comes
out of the stage. `stage_run` first bounds that for stage processes (`HTTP_RETRY_ENV`:
3 retries, backoff factor 1, 20 s timeout, so a dead server is known in ~6-9 s per call; MLflow
reads these variables at every request, and a value the user exported wins). A tracker call
that fails while the server's /health does not answer raises `TrackingUnavailable` (one line:
the URI); later calls check /health once instead of waiting again. The stage then settles the run
if the server came back, else says the run could not be marked (it stays RUNNING; the rerun
resumes it). The checkpointer flushes before it writes, so a failed flush keeps the previous
checkpoint and the rerun logs the steps since then again, none twice, none missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from lfmodel.config import flatten
from lfmodel.server import ServerError, check_tracking_server, pid_alive  # H3: preflight

EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")

# MLflow's HTTP retry settings for stage processes (see the module docstring); setdefault only.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering during a stage; the message names the URI."""


@contextlib.contextmanager
def server_loss_exits(stage: str) -> Iterator[None]:
    """Around a stage's run: a tracking server lost mid-stage is one line and exit 1 (the stage
    is safe to rerun: its outputs are rewritten, the run is reopened by id)."""
    try:
        yield
    except TrackingUnavailable as err:
        print(f"{stage}: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def bound_http_retries() -> None:
    """A dead server is reported in seconds, not minutes; a variable the user set wins."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)


def repo_root() -> Path:
    """DVC_ROOT when DVC runs us (parent repo for queued runs), else the git top level."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True)
        return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    """The store every entry point uses: MLFLOW_TRACKING_URI, else SQLite in the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def store() -> tuple[str, Path | None]:
    """(tracking URI, artifact root): the root is `<repo root>/mlartifacts` for the default
    SQLite store, None where the URI decides (a server, or a store named by the user)."""
    uri = tracking_uri()
    return uri, (repo_root() / "mlartifacts" if _is_default_store(uri) else None)


def ui_command(host: str, port: int) -> list[str]:
    """`mlflow ui` over the store the stages log to (`lfmodel ui`, `make ui`).

    A server URI has its own UI: raises ValueError naming it.
    """
    uri, artifacts = store()
    if uri.startswith(("http://", "https://")):
        raise ValueError(f"MLFLOW_TRACKING_URI is a server ({uri}): open it in a browser")
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else "mlflow", "ui", "--host", host, "--port", str(port),
           "--workers", "1", "--backend-store-uri", uri]
    return cmd + (["--default-artifact-root", str(artifacts)] if artifacts else [])


def _is_default_store(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI")


def retry(fn: Callable[[], Any], attempts: int = 12, delay: float = 0.2) -> Any:
    """Call fn, retrying on SQLite 'database is locked' (parallel DVC queue workers)."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps sqlalchemy's OperationalError
            if "locked" not in str(err).lower() or i == attempts - 1:
                raise
            time.sleep(delay * (1.5 ** i))
    return None


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Serialize store creation / experiment creation across processes (queue workers)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mlflow.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _quiet_mlflow() -> None:
    """Drop MLflow's INFO lines (schema creation, migrations) from stage output."""
    if os.environ.get("MLFLOW_LOGGING_LEVEL"):
        return
    for name in ("mlflow.store.db.utils", "mlflow.store.db", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # an async batch's failure is re-raised by its wait() in Tracker.flush, and urllib3's retry
    # notices precede a failure reported there: neither needs its own lines on stderr
    logging.getLogger("mlflow.utils.async_logging").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def get_client(experiment: str) -> tuple[Any, str]:
    """(MlflowClient, experiment_id); creates the store schema and experiment once, locked."""
    from mlflow.tracking import MlflowClient

    _quiet_mlflow()
    uri = tracking_uri()
    root = repo_root()
    with _store_lock(root) if _is_default_store(uri) else contextlib.nullcontext():
        client = MlflowClient(tracking_uri=uri)
        exp = retry(lambda: client.get_experiment_by_name(experiment))
        if exp is None:
            artifacts = store()[1]
            location = artifacts.as_uri() if artifacts else None
            exp_id = retry(lambda: client.create_experiment(
                experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND_TAG])))
        else:
            exp_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG[0]) != EXPERIMENT_KIND_TAG[1]:
                retry(lambda: client.set_experiment_tag(exp_id, *EXPERIMENT_KIND_TAG))
    return client, exp_id


def file_hash(*paths: str | Path) -> str:
    """sha256 over files (folders walked in sorted order); short hex."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(f.name.encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_tags(params_path: str = "params.yaml", data_dir: str = "data/prepared") -> dict[str, str]:
    """Tags of a new run: MLflow's own source tags (as `mlflow.start_run` resolves them:
    mlflow.source.name / .type / .git.commit, mlflow.user), DVC's experiment, hashes, versions.
    """
    from mlflow.tracking.context.registry import resolve_tags

    commit = _git("rev-parse", "HEAD")
    tags = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "") or commit,
        "git.commit": commit,
        "params_hash": file_hash(params_path),
        "data_hash": file_hash(data_dir),
        **{f"version.{lib}": metadata.version(lib) for lib in ("torch", "mlflow", "dvc")},
        # --- lfmodel sweep hook (H3, issue 11): set by `lfmodel sweep` so the run nests under
        # the sweep's parent run in the UI and names its sweep and Ray node.
        "mlflow.parentRunId": os.environ.get("LFMODEL_PARENT_RUN_ID", ""),
        "lfmodel.sweep_id": os.environ.get("LFMODEL_SWEEP_ID", ""),
        "lfmodel.node_id": os.environ.get("LFMODEL_NODE_ID", ""),
        # --- end sweep hook
    }
    return resolve_tags({k: v for k, v in tags.items() if v})


def run_name(tags: dict[str, str]) -> str:
    """The experiment's name under DVC, else `repro-<commit7>-<params hash 6>` (a plain
    `dvc repro` or a stage run by hand): runs of other commits or params look different."""
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("git.commit", "")[:7]
    return "-".join(p for p in ("repro", commit, tags["params_hash"][:6]) if p)


def log_dataset(client: Any, run_id: str, data_dir: str | Path = "data/prepared") -> None:
    """The prepared data as the run's dataset input (digest = the data hash), so the UI shows
    it and can filter runs by it."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    data_dir = Path(data_dir)
    meta_file = data_dir / "meta.json"
    if not meta_file.exists():
        return
    meta = json.loads(meta_file.read_text())
    profile = {k: meta[k] for k in ("kind", "sizes", "seq_len", "vocab_size") if k in meta}
    dataset = Dataset(name=meta.get("source", data_dir.name), digest=file_hash(data_dir),
                      source_type="local", source=json.dumps({"uri": data_dir.as_posix()}),
                      profile=json.dumps(profile))
    inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "train")])]
    try:
        retry(lambda: client.log_inputs(run_id, inputs))
    except Exception as err:
        # Two runs of the same data (Ray nodes, queue workers) log it at the same moment: the
        # store's get-or-create of the dataset row races and the loser's insert hits its unique
        # key (seen on PostgreSQL in test_ray_two_nodes). Again, it finds the row and links it.
        if not any(k in str(err).lower() for k in ("duplicate key", "unique constraint")):
            raise
        retry(lambda: client.log_inputs(run_id, inputs))


class Tracker:
    """Buffered, async metric logging into one run; artifacts; status bookkeeping.

    Every call to the store goes through `_send`: a failure while the tracking server does not
    answer raises TrackingUnavailable, and once the server is lost each later call checks
    /health once (fast) instead of spending MLflow's retries again.
    """

    def __init__(self, client: Any, run_id: str, stage: str, flush_every: int = 1000) -> None:
        self.client, self.run_id, self.stage = client, run_id, stage
        self.flush_every = flush_every
        self.uri = tracking_uri()
        self.lost = False
        self._buffer: list[Any] = []
        self._pending: list[Any] = []

    def _check_server(self) -> None:
        """Raise TrackingUnavailable if the URI is a server whose /health does not answer."""
        try:
            check_tracking_server(self.uri, seconds=0)
        except ServerError:
            self.lost = True
            raise TrackingUnavailable(f"MLflow tracking server {self.uri} stopped answering "
                                      f"during {self.stage}") from None
        self.lost = False

    def _send(self, fn: Callable[[], Any]) -> Any:
        if self.lost:
            self._check_server()
        try:
            return retry(fn)
        except Exception:
            self._check_server()  # a server that is gone says so; any other failure is raised
            raise

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items()
                            if v is not None and v == v)
        if len(self._buffer) >= self.flush_every and not self.lost:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Send buffered metrics (async batches); wait=True blocks until all are stored.

        An async batch that failed (e.g. the store stayed locked) is resent synchronously,
        unless the server is gone (TrackingUnavailable: the checkpointer then keeps the
        previous checkpoint).
        """
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            op = self._send(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c,
                                                                  synchronous=False))
            self._pending.append((op, chunk))
        if wait:
            pending, self._pending = self._pending, []
            for op, chunk in pending:
                try:
                    if op is not None:
                        op.wait()
                except Exception:
                    self._check_server()
                    self._send(lambda c=chunk: self.client.log_batch(self.run_id, metrics=c))

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):
            self._send(lambda c=flat[i:i + 100]: self.client.log_batch(self.run_id, params=c))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._send(lambda: self.client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._send(lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path))
        elif path.exists():
            self._send(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_status(self, status: str) -> None:
        if status == "RUNNING":
            self._send(lambda: self.client.update_run(self.run_id, status="RUNNING"))
        else:
            self._send(lambda: self.client.set_terminated(self.run_id, status=status))


RUN_FILE = "reports/train/run.json"


def read_run_file(path: str | Path = RUN_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run the train stage first (dvc repro)")
    return json.loads(path.read_text())


def raise_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind as Ctrl-C does, so a run (or a sweep's parent) ends KILLED."""
    raise KeyboardInterrupt(f"signal {signum}")


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: client.get_run(run_id))
        return True
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or \
                "not found" in str(err).lower():
            return False
        raise


def _settle_orphans(client: Any, exp_id: str, name: str, new_run_id: str) -> None:
    """Mark KILLED the RUNNING runs of this name whose stage process on this host is gone: a
    stage killed with SIGKILL (or a lost machine) before a checkpoint let the rerun resume its
    run. MLflow cannot learn that a process died, and the UI would show them running forever.
    A run of another host, or whose process is alive, is left alone."""
    if "'" in name:
        return
    host = socket.gethostname()
    found = retry(lambda: client.search_runs(
        [exp_id], f"attributes.status = 'RUNNING' and tags.`mlflow.runName` = '{name}'"))
    for r in found:
        pid = r.data.tags.get("lfmodel.pid", "")
        if (r.info.run_id == new_run_id or r.data.tags.get("lfmodel.host") != host
                or not pid.isdigit() or pid_alive(int(pid))):
            continue
        retry(lambda r=r, pid=pid: client.set_tag(
            r.info.run_id, "lfmodel.orphaned", f"process {pid} gone; rerun as {new_run_id}"))
        retry(lambda r=r: client.set_terminated(r.info.run_id, "KILLED"))


def _new_run(client: Any, exp_id: str, stage: str, params: dict,
             extra_tags: dict[str, str] | None = None) -> Tracker:
    tags = {**run_tags(), **(extra_tags or {})}
    run = retry(lambda: client.create_run(exp_id, run_name=run_name(tags), tags=tags))
    _settle_orphans(client, exp_id, run_name(tags), run.info.run_id)
    tracker = Tracker(client, run.info.run_id, stage)
    tracker.log_params(params)
    log_dataset(client, run.info.run_id)
    return tracker


def _settle(tracker: Tracker, stage: str, status: str, tags: dict[str, str]) -> bool:
    """Flush, tag and set the terminal status; True once marked. A failing flush never keeps
    the run RUNNING; a server that is gone is not waited for (False: the caller's one line
    says the run could not be marked)."""
    try:
        try:
            tracker.flush()
        except TrackingUnavailable:
            raise
        except Exception as err:  # still mark the run
            print(f"{stage}: MLflow flush failed: {err}", file=sys.stderr)
        try:
            tracker.set_tags(tags)
        finally:
            tracker.set_status(status)
    except TrackingUnavailable:
        return False
    return True


@contextlib.contextmanager
def unlogged_stage(stage: str, params: dict) -> Iterator[None]:
    """Around a stage that logs nothing (trace: it skips MLflow's start-up cost): only if it
    fails or is killed, the pipeline's run is opened to be marked FAILED / KILLED with the
    stage's tags, as stage_run would; the stage's own error is what propagates. On success the
    stage that logs its outputs (evaluate) tags it done."""
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        yield
    except BaseException as err:
        if not isinstance(err, SystemExit):  # a bad-params exit 2 has no run to mark
            with contextlib.suppress(BaseException):  # best effort: the stage's error wins
                with stage_run(stage, params, run_id=read_run_file()["run_id"]):
                    raise err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(stage: str, params: dict, run_id: str | None = None) -> Iterator[Tracker]:
    """Open (run_id given) or create the pipeline's run for one stage; settle its status.

    A new run gets all params (flattened: lambda_entropy, surge.mode, ...) and the tags. A
    run_id the store does not know starts a new run (see the module docstring); the stage
    should report `tracker.run_id`, the run it really logged into.
    """
    bound_http_retries()
    # --- server preflight hook (H3, issue 11): a tracking server that is down fails the stage
    # in seconds with one line, not after minutes of MLflow's HTTP retries and a traceback.
    try:
        check_tracking_server(tracking_uri())
    except ServerError as err:
        print(f"{stage}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    # --- end preflight hook
    client, exp_id = get_client(params["tracking"]["experiment"])
    if run_id is None:
        tracker = _new_run(client, exp_id, stage, params)
    elif not _run_exists(client, run_id):
        print(f"{stage}: MLflow run {run_id} (from train) is not in {tracking_uri()}; "
              "logging into a new run", file=sys.stderr)
        tracker = _new_run(client, exp_id, stage, params, {"lfmodel.train_run_id": run_id,
                                                           "lfmodel.train_run_missing": "true"})
    else:
        tracker = Tracker(client, run_id, stage)
        tracker.set_status("RUNNING")
    # the process that holds the run RUNNING: a rerun settles it if that process is gone
    tracker.set_tags({f"dvc.stage.{stage}": "running", "lfmodel.host": socket.gethostname(),
                      "lfmodel.pid": str(os.getpid())})
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        yield tracker
        tracker.flush()
        tracker.set_tags({f"dvc.stage.{stage}": "done"})
        tracker.set_status("FINISHED")
    except KeyboardInterrupt:
        _settle(tracker, stage, "KILLED", {f"dvc.stage.{stage}": "killed"})
        raise
    except TrackingUnavailable as err:
        marked = _settle(tracker, stage, "FAILED", {f"dvc.stage.{stage}": "failed",
                                                    f"dvc.stage.{stage}.error": str(err)})
        state = "marked FAILED" if marked else "could not be marked (left RUNNING)"
        raise TrackingUnavailable(f"{err}; run {tracker.run_id} {state}") from None
    except BaseException as err:
        _settle(tracker, stage, "FAILED", {f"dvc.stage.{stage}": "failed",
                                           f"dvc.stage.{stage}.error": str(err)[:4000]})
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


class MLflowHook:
    """Trainer hook: step metrics at log/eval/event steps, events, sparsity snapshots."""

    def __init__(self, tracker: Tracker, snapshot_every: int, out_dir: str | Path) -> None:
        self.tracker = tracker
        self.snapshot_every = snapshot_every
        self.out_dir = Path(out_dir)
        self.event_counts: dict[str, int] = {}

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.tracker.log_metrics(metrics, step)
        if step % self.snapshot_every == 0:
            snap = {f"sparsity/{g}": s for g, s in trainer.masks.group_sparsity().items()}
            self.tracker.log_metrics({k: v for k, v in snap.items() if k not in metrics}, step)

    def on_event(self, trainer: Any, event: dict) -> None:
        rule = event["rule"]
        self.event_counts[rule] = self.event_counts.get(rule, 0) + 1
        self.tracker.log_metrics({f"events/{rule}": self.event_counts[rule]}, event["step"])
        if trainer.masks.enabled:
            self._save_masks(trainer, event["step"])

    def _save_masks(self, trainer: Any, step: int) -> None:
        trainer.masks.save(self.out_dir / "sparsity" / f"step_{step:06d}.safetensors")
