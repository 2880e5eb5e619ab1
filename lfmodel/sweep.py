"""`lfmodel sweep`: a grid of DVC experiments on this machine's DVC queue or on a Ray cluster.

    lfmodel sweep -S 'lambda_entropy=0,0.01,0.05' -S surge.mode=static,rigl --seeds 0-4 \
        --name s1 [--set train.steps=400] [--backend local -j 2 | --backend ray --address ADDR]

`-S` axes are crossed (cartesian, like `dvc exp run -S`); `--seeds` adds the `seed` axis;
`--set` values apply to every point without naming it. Experiment names are deterministic:
`<sweep id>-<mode>-l<lambda>-<other axes>-s<seed>` (the study's scheme on the study's grid).
In Python, run_local / run_ray also take `Points`, an explicit list of named points (the study's
design is a list of arms, not a product).

The records are DVC experiments and MLflow runs: one parent run per sweep (grid, sweep id,
commit, backend; a summary table at the end); every experiment's run carries
`mlflow.parentRunId`, `lfmodel.sweep_id` and, on Ray, `lfmodel.node_id`. A sweep id reused with
the same grid resumes (points with a complete run, or locally an entry in DVC's queue, are
skipped); with another grid it is refused. A driver stopped early ends its parent run FAILED
(an error) or KILLED (Ctrl-C, SIGTERM), never RUNNING.

Backends:
  local  `dvc exp run --queue` per point (DVC's API, one process), then `dvc exp run --run-all -j N`
         (SQLite store is fine). It runs every entry of DVC's queue, so a queue that holds other
         experiments is refused.
  ray    one Ray task per point in a fresh clone of `origin`: `dvc exp run --pull -n NAME`, then
         `dvc push` and `dvc exp push origin NAME`; a retried task that finds its ref on origin
         returns it. A point counts as done only with its ref on origin: one whose run finished
         but whose push failed has its run marked FAILED and runs again on a resume. The
         driver then `dvc exp pull`s every experiment. Needs an MLflow server (lfmodel server).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lfmodel.config import ParamsError, load_params, load_yaml, validate, yaml_problem
from lfmodel.tracking import get_client, raise_on_sigterm, tracking_uri

PARENT_ROLE = ("lfmodel.sweep.role", "parent")
POLL_SECONDS = 10.0


class SweepError(RuntimeError):
    """Bad input or a precondition that fails: one line, exit 2, nothing queued."""


# ---------------------------------------------------------------------------- the grid

def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """'k=a,b,c' -> ('k', [a, b, c]) with YAML scalars (0.01 -> float, rigl -> str)."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SweepError(f"-S {spec!r}: expected KEY=V1,V2,...")
    try:
        vals = [load_yaml(v) for v in values.split(",") if v.strip()]
    except yaml.YAMLError as err:
        raise SweepError(f"-S {spec!r}: not a YAML value ({yaml_problem(err)})") from None
    if not vals:
        raise SweepError(f"-S {spec!r}: empty grid (no values for {key})")
    return key, vals


def parse_seeds(spec: str) -> list[int]:
    """'0-4' -> [0..4]; '0,2,5' -> [0, 2, 5]."""
    try:
        if re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", spec):
            lo, hi = (int(x) for x in spec.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SweepError(f"--seeds {spec!r}: expected a range A-B or a list A,B,C") from None
    if not seeds:
        raise SweepError(f"--seeds {spec!r}: empty grid (no seeds)")
    return seeds


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return re.sub(r"[^A-Za-z0-9_.]", "_", str(value))
    return f"m{abs(value):g}" if value < 0 else f"{value:g}"


def _name_part(key: str, value: Any) -> str:
    prefix = {"surge.mode": "", "lambda_entropy": "l", "seed": "s"}.get(key)
    if prefix is None:
        prefix = key.rsplit(".", 1)[-1].replace("_", "")
    return prefix + _fmt(value)


def _order(key: str) -> int:
    """Name order: surge.mode, lambda_entropy, other axes, seed last (the study's names)."""
    return {"surge.mode": 0, "lambda_entropy": 1, "seed": 3}.get(key, 2)


@dataclass
class Grid:
    axes: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        """Seed-major (every arm of seed 0 first), so a sweep cut short still has every arm."""
        keys = sorted(self.axes, key=lambda k: 0 if k == "seed" else 1)
        return [dict(zip(keys, combo, strict=True))
                for combo in itertools.product(*(self.axes[k] for k in keys))]

    def name(self, sweep_id: str, point: dict[str, Any]) -> str:
        keys = sorted(point, key=_order)
        return "-".join([sweep_id, *(_name_part(k, point[k]) for k in keys)])

    def overrides(self, point: dict[str, Any]) -> dict[str, Any]:
        """Every override of one point: fixed values first, then the point's."""
        return {**self.fixed, **point}

    def sets(self, point: dict[str, Any]) -> list[str]:
        """The `-S key=value` list for one point."""
        return [f"{k}={_yaml(v)}" for k, v in self.overrides(point).items()]

    def identity(self) -> str:
        return json.dumps({"axes": self.axes, "fixed": self.fixed}, sort_keys=True)

    def merged(self, old: str) -> str | None:
        """A grid reuses a sweep id only with the same grid: never merges."""
        return None


@dataclass
class Points:
    """An explicit list of points (a design, not a cartesian product): {name suffix: overrides}.
    It is a Grid with one axis, `point`, whose values are the suffixes; the experiment name is
    `<sweep id>-<suffix>`. `fixed` applies to every point AFTER its own values (the study's tiny
    test shortens `train.steps` with it). A sweep id may be reused with a list that contains the
    earlier one or is contained in it (a study's second phase, a resume of a part): the parent
    run keeps the union; a point whose overrides changed under its name is refused."""
    named: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def axes(self) -> dict[str, list[str]]:
        return {"point": list(self.named)}

    def points(self) -> list[dict[str, Any]]:
        return [{"point": s} for s in self.named]

    def name(self, sweep_id: str, point: dict[str, Any]) -> str:
        return f"{sweep_id}-{point['point']}"

    def overrides(self, point: dict[str, Any]) -> dict[str, Any]:
        return {**self.named[point["point"]], **self.fixed}

    def sets(self, point: dict[str, Any]) -> list[str]:
        return [f"{k}={_yaml(v)}" for k, v in self.overrides(point).items()]

    def _digests(self) -> list[str]:
        """One short hash per point (name and overrides): the grid tag stays under MLflow's
        8000-character tag limit for a few hundred points."""
        return sorted(hashlib.sha256(json.dumps([s, self.overrides(p)], sort_keys=True).encode())
                      .hexdigest()[:8] for s, p in zip(self.named, self.points(), strict=True))

    def identity(self) -> str:
        return json.dumps({"points": self._digests()})

    def merged(self, old: str) -> str | None:
        """The union's identity when one list contains the other, else None (refused)."""
        try:
            before = set(json.loads(old)["points"])
        except (ValueError, KeyError, TypeError):
            return None
        now = set(self._digests())
        if not (before <= now or now <= before):
            return None
        return json.dumps({"points": sorted(before | now)})


def _yaml(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def check_grid(grid: Grid | Points, sweep_id: str,
               params_path: Path = Path("params.yaml")) -> dict[str, dict]:
    """Validate every point against the params schema; {name: point}. Raises SweepError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.]*", sweep_id):
        raise SweepError(f"--name {sweep_id!r}: use letters, digits, '_' and '.' (a git ref part)")
    if not grid.axes or any(not v for v in grid.axes.values()):
        raise SweepError("empty grid: give at least one -S KEY=V1,V2 or --seeds")
    if os.environ.get("LFMODEL_PARAMS"):
        raise SweepError("LFMODEL_PARAMS is set, but a sweep's experiments read the params.yaml "
                         "DVC writes (config.params_file refuses it under DVC): unset it")
    raw = load_yaml(params_path.read_text()) if params_path.is_file() else {}
    names: dict[str, dict] = {}
    for point in grid.points():
        trial = json.loads(json.dumps(raw or {}))
        for k, v in grid.overrides(point).items():
            _set_dotted(trial, k, v)
        try:
            validate(trial, base_dir=params_path.parent)
        except ParamsError as err:
            raise SweepError(f"{err}") from None
        name = grid.name(sweep_id, point)
        if name in names:
            raise SweepError(f"two grid points get the same experiment name {name!r}; "
                             "repeated values?")
        names[name] = point
    return names


# ---------------------------------------------------------------------------- MLflow records

def run_complete(run: Any) -> bool:
    """train marks a run FINISHED before trace/evaluate reopen it: complete = evaluate done."""
    return run.info.status == "FINISHED" and run.data.tags.get("dvc.stage.evaluate") == "done"


def child_runs(client: Any, exp_id: str, names: set[str]) -> dict[str, list[Any]]:
    """Runs of these experiment names (by the dvc.exp_name tag), newest first."""
    prefixes = {n.split("-", 1)[0] for n in names}
    out: dict[str, list[Any]] = {}
    for prefix in prefixes:
        runs = client.search_runs([exp_id], filter_string=f"tags.`dvc.exp_name` LIKE '{prefix}-%'",
                                  max_results=50000, order_by=["attributes.start_time DESC"])
        for r in runs:
            name = r.data.tags.get("dvc.exp_name")
            if name in names:
                out.setdefault(name, []).append(r)
    return out


def existing_parent(client: Any, exp_id: str, sweep_id: str, grid: Grid | Points) -> str | None:
    """The parent run of an earlier start of this sweep id; SweepError if its grid differs
    (a Points list may grow or shrink, see Points; the parent's grid tag becomes the union)."""
    runs = client.search_runs(
        [exp_id], max_results=10,
        filter_string=f"tags.`lfmodel.sweep_id` = '{sweep_id}' and "
                      f"tags.`{PARENT_ROLE[0]}` = '{PARENT_ROLE[1]}'")
    if runs:
        old = runs[0].data.tags.get("lfmodel.sweep.grid")
        union = grid.merged(old) if old != grid.identity() else old
        if union is None:
            raise SweepError(f"sweep id {sweep_id!r} was already used with another grid ({old}); "
                             "use a new --name")
        if union != old:
            client.set_tag(runs[0].info.run_id, "lfmodel.sweep.grid", union)
        return runs[0].info.run_id
    return None


def parent_run(client: Any, exp_id: str, sweep_id: str, grid: Grid | Points, backend: str) -> str:
    """The sweep's parent run id: reopened (same grid) or created. Raises SweepError."""
    rid = existing_parent(client, exp_id, sweep_id, grid)
    if rid:
        client.update_run(rid, status="RUNNING")
        return rid
    commit = _git("rev-parse", "HEAD")
    run = client.create_run(exp_id, run_name=sweep_id, tags={
        "lfmodel.sweep_id": sweep_id, PARENT_ROLE[0]: PARENT_ROLE[1],
        "lfmodel.sweep.grid": grid.identity(), "lfmodel.sweep.backend": backend,
        "git.commit": commit, "mlflow.note.content": f"lfmodel sweep {sweep_id} ({backend})"})
    rid = run.info.run_id
    for k, v in grid.axes.items():
        client.log_param(rid, f"grid.{k}", ",".join(_yaml(x) for x in v)[:6000])
    for k, v in grid.fixed.items():
        client.log_param(rid, f"set.{k}", _yaml(v))
    client.log_param(rid, "grid.size", len(grid.points()))
    return rid


@contextlib.contextmanager
def settled(client: Any, parent_id: str) -> Iterator[None]:
    """Around a driver's work after parent_run: a driver that stops early must not leave the
    parent RUNNING (a sweep that looks alive). Ctrl-C or SIGTERM (turned into KeyboardInterrupt
    by tracking's handler, as for a stage's run) ends it KILLED, an error FAILED; summarize
    sets the status of a sweep that ran to its end."""
    main = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm) if main else None
    try:
        yield
    except BaseException as err:
        with contextlib.suppress(Exception):  # the driver's own error is what propagates
            client.set_terminated(parent_id, status="KILLED" if isinstance(err, KeyboardInterrupt)
                                  else "FAILED")
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def summarize(client: Any, exp_id: str, parent_id: str, sweep_id: str,
              names: dict[str, dict], extra: dict[str, dict] | None = None) -> list[str]:
    """Tag children under the parent (if a stage missed the env), log the summary table on the
    parent, set its status; return the names without a complete run."""
    runs = child_runs(client, exp_id, set(names))
    rows, missing = [], []
    for name, point in names.items():
        done = [r for r in runs.get(name, []) if run_complete(r)]
        for r in runs.get(name, []):
            if r.info.status == "RUNNING" and done:  # an attempt killed with its node
                client.set_terminated(r.info.run_id, status="KILLED")
        if not done:
            missing.append(name)
            rows.append({"exp_name": name, **point, "status": "MISSING"})
            continue
        r = done[0]
        if r.data.tags.get("mlflow.parentRunId") != parent_id:
            client.set_tag(r.info.run_id, "mlflow.parentRunId", parent_id)
            client.set_tag(r.info.run_id, "lfmodel.sweep_id", sweep_id)
        rows.append({"exp_name": name, **point, "status": "FINISHED", "run_id": r.info.run_id,
                     "node_id": r.data.tags.get("lfmodel.node_id", ""),
                     **{m: r.data.metrics.get(m, math.nan) for m in ("test_loss", "excess_loss",
                                                                      "sparsity")},
                     **(extra or {}).get(name, {})})
    with tempfile.TemporaryDirectory() as tmp:
        import pandas as pd

        table = pd.DataFrame(rows)
        table.to_csv(Path(tmp) / "summary.csv", index=False)
        (Path(tmp) / "summary.md").write_text(table.to_markdown(index=False)
                                              if _has_tabulate() else table.to_string(index=False))
        client.log_artifact(parent_id, str(Path(tmp) / "summary.csv"))
        client.log_artifact(parent_id, str(Path(tmp) / "summary.md"))
    client.log_metric(parent_id, "sweep.finished", len(names) - len(missing))
    client.log_metric(parent_id, "sweep.missing", len(missing))
    client.set_terminated(parent_id, status="FINISHED" if not missing else "FAILED")
    return missing


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- helpers

def _git(*args: str, cwd: str | Path | None = None) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _bin_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This interpreter's bin first on PATH (dvc runs `python -m stages.X`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.update(extra or {})
    return env


class Progress:
    """done / total, failures, ETA from the rate so far; one line every call."""

    def __init__(self, sweep_id: str, total: int, already: int) -> None:
        self.sweep_id, self.total, self.already = sweep_id, total, already
        self.t0 = time.time()
        self.last = ""

    def show(self, done: int, failed: int) -> None:
        new = done - self.already
        elapsed = time.time() - self.t0
        left = self.total - done - failed
        eta = (f"ETA {elapsed / new * left / 60:.1f} min" if new > 0 and left > 0
               else "ETA n/a" if left > 0 else "done")
        line = (f"sweep {self.sweep_id}: {done}/{self.total} done, {failed} failed, "
                f"{elapsed / 60:.1f} min, {eta}")
        if line.split(", ")[:2] != self.last.split(", ")[:2] or not self.last:
            print(line, flush=True)
        self.last = line


def _tally(client: Any, exp_id: str, names: set[str], since: float) -> tuple[int, int]:
    runs = child_runs(client, exp_id, names)
    done = sum(any(run_complete(r) for r in rs) for rs in runs.values())
    failed = sum(1 for rs in runs.values() if not any(run_complete(r) for r in rs)
                 and rs[0].info.status in ("FAILED", "KILLED")
                 and rs[0].info.start_time / 1000 >= since)
    return done, failed


# ---------------------------------------------------------------------------- local backend

def run_local(sweep_id: str, grid: Grid | Points, jobs: int = 2, experiment: str | None = None,
              skip: frozenset[str] = frozenset()) -> list[str]:
    """Queue the points with neither a complete run nor an entry in DVC's queue, run the queue
    with -j jobs; names still missing. `skip`: names not to run (the study's diverged points);
    they count as missing."""
    names = check_grid(grid, sweep_id)
    experiment = experiment or load_params()["tracking"]["experiment"]
    client, exp_id = get_client(experiment)
    waiting = in_queue(sweep_id, set(names))  # before parent_run: a refusal changes nothing
    parent = parent_run(client, exp_id, sweep_id, grid, "local")
    with settled(client, parent):
        done = {n for n, rs in child_runs(client, exp_id, set(names)).items()
                if any(run_complete(r) for r in rs)}
        todo = [n for n in names if n not in done and n not in waiting and n not in skip]
        env = _bin_env({"LFMODEL_SWEEP_ID": sweep_id, "LFMODEL_PARENT_RUN_ID": parent})
        queue(todo, {n: grid.sets(names[n]) for n in todo})
        print(f"sweep {sweep_id}: {len(names)} grid points, {len(done)} already complete, queued "
              f"{len(todo)}" + (f", {len(waiting)} already in DVC's queue" if waiting else "") +
              (f", {len(skip - done)} skipped" if skip - done else "") +
              f"; running with -j {jobs} (MLflow parent run {parent} in {tracking_uri()})",
              flush=True)
        progress = Progress(sweep_id, len(names), len(done))
        t0 = time.time()
        if todo or waiting:
            # DVC's output is relayed, not inherited: the queue workers it detaches keep the fds
            # it had, and a worker that hangs on shutdown (seen once, after its task succeeded)
            # would then hold our caller's pipe open (`lfmodel sweep | tee`, a test) after we
            # return.
            proc = subprocess.Popen(["dvc", "exp", "run", "--run-all", "-j", str(jobs)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            threading.Thread(target=_relay, args=(proc.stdout,), daemon=True).start()
            try:
                while proc.poll() is None:
                    try:
                        proc.wait(POLL_SECONDS)
                    except subprocess.TimeoutExpired:
                        pass
                    progress.show(*_tally(client, exp_id, set(names), t0))
            finally:  # stopped early: no orphan follower (DVC's workers go on, `dvc queue status`)
                if proc.poll() is None:
                    proc.terminate()
            # DVC's queue reports success for an experiment it failed to save (seen with its
            # ref's path blocked); only runs this driver's queue started are judged here
            for name in fail_unsaved(client, exp_id, set(names), local_exps(),
                                     "in this repository", lambda r: r.info.start_time >= t0 * 1000
                                     and not _on_ray(r)):
                print(f"sweep {sweep_id}: {name} finished but DVC did not save its experiment: "
                      "run marked FAILED, a resume runs it again", file=sys.stderr)
        progress.show(*_tally(client, exp_id, set(names), t0))
        missing = summarize(client, exp_id, parent, sweep_id, names)
    _report_missing(sweep_id, names, missing)
    return missing


def in_queue(sweep_id: str, names: set[str]) -> set[str]:
    """The names that DVC's queue already holds (queued, or running in a worker of an earlier
    driver): a resume must not queue them again, `--run-all` runs every entry, duplicates too.
    SweepError when it holds other experiments: `--run-all` cannot be limited to some entries
    and would run them under this sweep's parent run."""
    from dvc.repo import Repo

    with Repo() as repo:
        q = repo.experiments.celery_queue
        held = {e.name or e.stash_rev[:7] for e in (*q.iter_active(), *q.iter_queued())}
    foreign = sorted(held - names)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SweepError(f"DVC's queue holds {len(foreign)} experiment(s) outside sweep "
                         f"{sweep_id}'s grid ({shown}), and `dvc exp run --run-all` would run them "
                         "under it: `dvc queue remove` them or run them first (`dvc exp run --run-all`; "
                         "`dvc queue status` lists them)")
    return held & names


def queue(todo: list[str], sets: dict[str, list[str]]) -> None:
    """`dvc exp run --queue -n NAME -S ...` for each name, through DVC's API in this process:
    about 0.1 s a point instead of a ~1 s CLI start each (130 points: ~15 s, not 2.5 min)."""
    import io

    from dvc.repo import Repo

    with Repo() as repo:
        for name in todo:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # "Queued experiment ..." x N
                    repo.experiments.run(queue=True, name=name, params=sets[name])
            except Exception as err:  # DVC's, or Hydra's parse error on a -S value: one line
                first = (str(err).strip().splitlines() or [""])[0]
                raise SweepError(f"queueing {name} failed: {type(err).__name__}: "
                                 f"{first}") from None


def _relay(pipe: Any) -> None:
    """Copy a child's output to ours as it comes, until the pipe closes (or we exit)."""
    for chunk in iter(lambda: pipe.read1(65536), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def _report_missing(sweep_id: str, names: dict, missing: list[str]) -> None:
    if missing:
        print(f"sweep {sweep_id}: results != grid: {len(missing)} of {len(names)} missing: "
              f"{', '.join(missing)}", file=sys.stderr)
    else:
        print(f"sweep {sweep_id}: results == grid ({len(names)} experiments; `dvc exp show`)")


# ---------------------------------------------------------------------------- ray backend

def _ray_preflight(address: str | None) -> str:
    if not tracking_uri().startswith(("http://", "https://")):
        raise SweepError("--backend ray needs an MLflow tracking server, not the SQLite file: "
                         "start one with `lfmodel server --data DIR` and export the "
                         "MLFLOW_TRACKING_URI it prints")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SweepError("--backend ray needs --address HEAD:6379 (or RAY_ADDRESS)")
    if _git("status", "--porcelain", "--untracked-files=normal"):
        raise SweepError("the work tree is dirty: commit (or remove) your changes first; "
                         "workers run the pushed commit")
    if not _git("remote", "get-url", "origin"):
        raise SweepError("no git remote 'origin': workers clone the commit from it "
                         "(git remote add origin URL)")
    proc = subprocess.run(["dvc", "remote", "default"], capture_output=True, text=True,
                          env=_bin_env())
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SweepError("no default DVC remote: workers pull data from it "
                         "(dvc remote add -d NAME URL, committed)")
    host, _, port = address.replace("ray://", "").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise SweepError(f"Ray cluster at {address} is not reachable: start a head "
                         "(ray start --head) or fix --address") from None
    return address


def _exp_names(refs: str) -> set[str]:
    return {r.rsplit("/", 1)[-1] for r in refs.split() if r.startswith("refs/exps/")}


def origin_exps(origin: str) -> set[str]:
    """Names of the DVC experiments on origin (refs/exps/.../NAME)."""
    proc = subprocess.run(["git", "ls-remote", origin, "refs/exps/*"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SweepError(f"git ls-remote {origin} failed: "
                         f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return _exp_names(proc.stdout)


def local_exps() -> set[str]:
    """Names of the DVC experiments in this repository."""
    proc = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"git for-each-ref failed: {proc.stderr.strip()}")
    return _exp_names(proc.stdout)


def fail_unsaved(client: Any, exp_id: str, names: set[str], saved: set[str], where: str,
                 judged: Callable[[Any], bool]) -> list[str]:
    """A point whose run is complete but whose DVC experiment was never saved (`where`: its
    `dvc exp push` failed, its task died after evaluate, DVC's queue failed to save it) has
    no record that `dvc exp show` or a clone can find: mark the run FAILED (tag
    lfmodel.unsaved) so that it counts as missing and a resume runs the point again.
    `judged`: the runs this check may judge (a run made elsewhere was saved elsewhere)."""
    lost = []
    for name, runs in child_runs(client, exp_id, names - saved).items():
        for r in runs:
            if run_complete(r) and judged(r):
                client.set_tag(r.info.run_id, "lfmodel.unsaved", f"no DVC experiment {where}")
                client.set_terminated(r.info.run_id, status="FAILED")
                lost.append(name)
    return sorted(set(lost))


def _on_ray(run: Any) -> bool:
    """Made by a Ray task: its record is its ref on origin. A local run of a sweep resumed on
    Ray never had its ref on origin and is still a result."""
    return bool(run.data.tags.get("lfmodel.node_id"))


def run_point(origin: str, commit: str, name: str, sets: list[str], env: dict[str, str]) -> dict:
    """One grid point on a worker: reuse the experiment on origin, else clone, run, push."""
    import ray

    t0 = time.time()
    os.environ.update(env)
    node = ray.get_runtime_context().get_node_id()
    if name in origin_exps(origin):
        return {"name": name, "node_id": node, "seconds": time.time() - t0, "reused": True}
    full = _bin_env({**env, "LFMODEL_NODE_ID": node})
    full.pop("DVC_ROOT", None)
    # an earlier attempt of this point died with its node: its run must not stay RUNNING
    client, exp_id = get_client(env["LFMODEL_EXPERIMENT"])
    for runs in child_runs(client, exp_id, {name}).values():
        for r in runs:
            if r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, status="KILLED")
    work = Path(tempfile.mkdtemp(prefix=f"lfmodel-{name}-"))
    try:
        def sh(*cmd: str) -> str:
            proc = subprocess.run(cmd, cwd=work, env=full, capture_output=True, text=True)
            if proc.returncode != 0:  # the driver prints the last line: not DVC's footer
                lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines()
                         if ln.strip() and "dvc.org/support" not in ln]
                raise RuntimeError(f"{name}: {' '.join(cmd[:4])} failed: "
                                   f"{chr(10).join(lines)[-2000:]}")
            return proc.stdout

        sh("git", "clone", "-q", "--no-checkout", origin, ".")
        sh("git", "checkout", "-q", commit)
        cmd = ["dvc", "exp", "run", "--pull", "-n", name]
        for s in sets:
            cmd += ["-S", s]
        sh(*cmd)
        # the data first: `dvc exp push` pushes the ref before the cache, and a ref on origin
        # is what marks a point done (a retry returns it), so it must come last
        sh("dvc", "push", "-q")
        sh("dvc", "exp", "push", "origin", name)
        run_id = json.loads((work / "reports/train/run.json").read_text())["run_id"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"name": name, "node_id": node, "run_id": run_id, "seconds": time.time() - t0,
            "reused": False}


def run_ray(sweep_id: str, grid: Grid | Points, address: str | None, experiment: str | None = None,
            max_retries: int = 3, skip: frozenset[str] = frozenset()) -> list[str]:
    """Push, one Ray task per point, pull the experiments back; names still missing. `skip`
    as for run_local."""
    names = check_grid(grid, sweep_id)
    address = _ray_preflight(address)
    params = load_params()
    experiment = experiment or params["tracking"]["experiment"]
    client, exp_id = get_client(experiment)
    existing_parent(client, exp_id, sweep_id, grid)  # refuse a reused id before pushing
    origin = _git("remote", "get-url", "origin")
    commit = _git("rev-parse", "HEAD")
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    ref = f"HEAD:refs/heads/{branch}" if branch and branch != "HEAD" else \
        f"HEAD:refs/heads/lfmodel-sweep-{sweep_id}"
    for cmd in (["git", "push", "-q", "origin", ref], ["dvc", "push", "-q"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_bin_env())
        if proc.returncode != 0:
            raise SweepError(f"{' '.join(cmd[:2])} failed: "
                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    import ray

    # before settled: ray.init sets its own SIGTERM handler (sys.exit), which would win
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    parent = parent_run(client, exp_id, sweep_id, grid, "ray")
    with settled(client, parent):
        fail_unsaved(client, exp_id, set(names), origin_exps(origin), "on origin", _on_ray)
        done = {n for n, rs in child_runs(client, exp_id, set(names)).items()
                if any(run_complete(r) for r in rs)}
        todo = [n for n in names if n not in done and n not in skip]
        env = {"MLFLOW_TRACKING_URI": tracking_uri(), "LFMODEL_SWEEP_ID": sweep_id,
               "LFMODEL_PARENT_RUN_ID": parent, "LFMODEL_EXPERIMENT": experiment}
        task = ray.remote(run_point)

        def resources(point: dict) -> dict:
            """A task's CPUs = its train.threads (0: one); a GPU when its train.device is cuda."""
            over = grid.overrides(point)
            threads = int(over.get("train.threads", params["train"]["threads"])) or 1
            cuda = over.get("train.device", params["train"]["device"]) == "cuda"
            return {"num_cpus": threads, "num_gpus": 1 if cuda else 0}

        pending = {task.options(**resources(names[n]), max_retries=max_retries,
                                retry_exceptions=False).remote(origin, commit, n,
                                                               grid.sets(names[n]), env): n
                   for n in todo}
        print(f"sweep {sweep_id}: {len(names)} grid points, {len(done)} already complete, submitted "
              f"{len(todo)} Ray tasks to {address}" + (f", {len(skip - done)} skipped"
                                                       if skip - done else "") +
              f" (MLflow parent run {parent})", flush=True)
        progress = Progress(sweep_id, len(names), len(done))
        results: dict[str, dict] = {}
        failed: dict[str, str] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for fut in ready:
                name = pending.pop(fut)
                try:
                    results[name] = ray.get(fut)
                except Exception as err:  # the task's own error, after Ray's retries
                    failed[name] = str(err).strip().splitlines()[-1][:300]
                    print(f"sweep {sweep_id}: {name} failed: {failed[name]}", file=sys.stderr)
            progress.show(len(done) + len(results), len(failed))
        ray.shutdown()
        try:
            pushed = origin_exps(origin)
        except SweepError as err:  # the results are in MLflow: summarize them anyway
            print(f"sweep {sweep_id}: not checked which experiments reached origin: {err}",
                  file=sys.stderr)
            pushed = set(names)
        for name in fail_unsaved(client, exp_id, set(names), pushed, "on origin", _on_ray):
            print(f"sweep {sweep_id}: {name} finished but its DVC experiment is not on origin: "
                  "run marked FAILED, a resume runs it again", file=sys.stderr)
        pulled = [n for n in names if n in results or n in done]
        if pulled:
            proc = subprocess.run(["dvc", "exp", "pull", "origin", *pulled], capture_output=True,
                                  text=True, env=_bin_env())
            if proc.returncode != 0:
                print(f"sweep {sweep_id}: dvc exp pull failed: {proc.stderr.strip()[-500:]}",
                      file=sys.stderr)
        extra = {n: {"seconds": round(r["seconds"], 1)} for n, r in results.items()}
        missing = summarize(client, exp_id, parent, sweep_id, names, extra)
    _report_missing(sweep_id, names, missing)
    return missing
