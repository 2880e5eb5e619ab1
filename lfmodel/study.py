"""`lfmodel study` (= make study): the study of issue 13 through `lfmodel sweep`, then reports/study/.

    lfmodel study [--study-id ID] [--full] [--minutes 90] [--jobs N]
                  [--backend local|ray --address A] [--report-only | --from-runs CSV]

Design (lfmodel.arms): by default arms.default_design, the full design trimmed to finish in
`--minutes` on this machine's cores. Its cost input is measured at start: CALIB_STEPS training
steps of the default model in this process at one torch thread (process CPU per step), plus
arms.RUN_OVERHEAD_S per run; the wall time adds phase 2 and what runs alone, queueing and the
report (arms.Design.wall_seconds, measured, see there). `--full` is arms.full_design (a cluster's).
The design's points run as one sweep whose id is the study id (one MLflow parent run; the
backend is the sweep's: the local DVC queue, or Ray). The parent run keeps design.json (every
point's arm, target sparsity, budget, seed, lambdas and -S overrides), so a rerun with the same
id resumes that design (no recalibration; points with a complete run are skipped) and the
report knows every run's arm exactly. Phase 2: when the design has the bare controller
(adaptive_bare), static at the sparsity it reached (arms.matched_static) joins the same sweep.

Report: one row per complete child run of the parent (run id, parent run id, arm, ...; the
metrics of its metrics.json artifact) and its curves (train/loss.csv, train/val.csv artifacts),
then lfmodel.report.build_report with the wall time measured over the study's invocations and
CPU time = cores used x wall (the runs do not record their process CPU; the files say so).
`--report-only` rebuilds reports/study/ from MLflow; `--from-runs reports/study/runs.csv` from
the runs.csv an earlier report wrote (new statistics on the same runs, no MLflow store needed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lfmodel import arms, report
from lfmodel.config import DEFAULTS, ParamsError, load_params
from lfmodel.entropy import regularized_loss
from lfmodel.models import build_model
from lfmodel.optim import Adam, clip_grad_norm_
from lfmodel.sweep import (
    PARENT_ROLE,
    Grid,
    Points,
    SweepError,
    check_grid,
    parent_run,
    run_complete,
    run_local,
    run_ray,
)
from lfmodel.tracking import get_client, tracking_uri
from lfmodel.training import task_loss

OUT = report.OUT
STUDY_ID = "study"  # the default id: rerunning `make study` resumes it; a new study, a new id
CALIB_STEPS, CALIB_WARMUP = 20, 3
DESIGN_FILE = "design.json"
HEARTBEAT_S = 60.0  # how often a running study logs its wall time so far (timed)
OLD_FLAGS = ("--modes", "--lambdas", "--seeds", "--steps", "--set")


class StudyError(RuntimeError):
    """Bad input or a missing study: one line, exit 2."""


# ---------------------------------------------------------------------------- cost

def calibrate(batch_size: int, steps: int = CALIB_STEPS) -> float:
    """Process-CPU seconds per training step (forward with gates, task + entropy loss, backward,
    clip, Adam: the Trainer's, lfmodel.optim) of the default model at `batch_size`, one torch
    thread, after CALIB_WARMUP steps. CPU, not wall: a shared machine inflates wall time, the
    cost model counts CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t, d = DEFAULTS["train"], DEFAULTS["data"]
        gen = torch.Generator().manual_seed(0)
        model = build_model(DEFAULTS["model"], d["vocab_size"])
        params = list(model.parameters())
        opt = Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])
        x = torch.randint(0, d["vocab_size"], (batch_size, d["seq_len"] + 1), generator=gen)
        for i in range(CALIB_WARMUP + steps):
            if i == CALIB_WARMUP:
                t0 = time.process_time()
            out, gates = model(x[:, :-1], return_gates=True)
            loss, _ = regularized_loss(task_loss(out, x[:, 1:]), gates,
                                       DEFAULTS["lambda_entropy"], t["lambda_balance"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_grad_norm_(params, t["grad_clip"])
            opt.step()
        return (time.process_time() - t0) / steps
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- design <-> sweep

def exp_name(sweep_id: str, mode: str, lam: float, seed: int) -> str:
    """`<id>-<mode>-l<lambda>-s<seed>`: the sweep's naming of a surge.mode x lambda x seed grid
    (the 400-step study's; `lfmodel sweep` keeps it)."""
    return Grid({}).name(sweep_id, {"surge.mode": mode, "lambda_entropy": lam, "seed": seed})


def design_map(design: arms.Design, study_id: str) -> dict[str, dict[str, Any]]:
    """{experiment name: arm, target_sparsity, budget, seed, lambdas, sets}: design.json."""
    return {name: {"arm": p.arm, "target_sparsity": p.sparsity, "budget": p.budget,
                   "seed": p.seed, "lambda_entropy": p.lambda_entropy,
                   "lambda_balance": p.lambda_balance, "sets": dict(p.overrides)}
            for name, p in design.experiments(study_id).items()}


def to_points(dmap: dict[str, dict], study_id: str, extra: dict[str, Any] | None = None) -> Points:
    """The sweep's explicit point list; `extra` overrides every point (tests: tiny steps)."""
    cut = len(study_id) + 1
    return Points({name[cut:]: dict(v["sets"]) for name, v in dmap.items()}, dict(extra or {}))


def find_parent(client: Any, exp_id: str, study_id: str) -> str | None:
    runs = client.search_runs(
        [exp_id], max_results=1,
        filter_string=f"tags.`lfmodel.sweep_id` = '{study_id}' and "
                      f"tags.`{PARENT_ROLE[0]}` = '{PARENT_ROLE[1]}'")
    return runs[0].info.run_id if runs else None


def stored_design(client: Any, parent: str) -> dict[str, dict]:
    """The parent's design.json ({} if it has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent, DESIGN_FILE, tmp)
        except Exception:  # MLflow raises its own error types per store for a missing file
            return {}
        return json.loads(Path(path).read_text())


def store_design(client: Any, parent: str, dmap: dict[str, dict]) -> None:
    """Merge dmap into the parent's design.json (a later phase adds points, never drops)."""
    merged = {**stored_design(client, parent), **dmap}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / DESIGN_FILE).write_text(json.dumps(merged, indent=1, sort_keys=True))
        client.log_artifact(parent, str(Path(tmp) / DESIGN_FILE))


# ---------------------------------------------------------------------------- collection

def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _artifact_csv(client: Any, run_id: str, path: str, tmp: str) -> pd.DataFrame | None:
    try:
        return pd.read_csv(client.download_artifacts(run_id, path, tmp))
    except Exception:  # not logged (an older run): the caller falls back
        return None


def children(client: Any, exp_id: str, parent: str) -> list[Any]:
    """Every child run of the study's parent run, newest first."""
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                              max_results=50000, order_by=["attributes.start_time DESC"])


def collect(study_id: str,
            experiment: str) -> tuple[pd.DataFrame, pd.DataFrame, str, pd.DataFrame]:
    """(runs, curves, parent run id, diverged): one row per complete child run of the study's
    parent run whose experiment name is in its design.json (the newest complete run of a
    name), tagged with its arm / target sparsity / budget on the way (for the UI); and one row
    per design point without a complete run whose newest run diverged (report.DIVERGED_COLS):
    a result of its arm, not a missing record."""
    client, exp_id = get_client(experiment)
    parent = find_parent(client, exp_id, study_id)
    if parent is None:
        raise StudyError(f"no MLflow parent run for study {study_id!r} in {tracking_uri()}")
    dmap = stored_design(client, parent)
    kids = children(client, exp_id, parent)
    rows, curves, seen = [], [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for r in kids:
            name = r.data.tags.get("dvc.exp_name")
            if name not in dmap or name in seen or not run_complete(r):
                continue
            seen.add(name)
            d = dmap[name]
            rid = r.info.run_id
            row = {"run_id": rid, "parent_run_id": parent, "exp_name": name, "arm": d["arm"],
                   "target_sparsity": _nan(d["target_sparsity"]), "budget": int(d["budget"]),
                   "seed": int(d["seed"]), "lambda_entropy": float(d["lambda_entropy"]),
                   "lambda_balance": float(d["lambda_balance"])}
            try:
                metrics = json.loads(Path(client.download_artifacts(rid, "metrics.json", tmp))
                                     .read_text())
            except Exception:  # metrics.json not an artifact: the run's logged metrics
                metrics = {k: v for k, v in r.data.metrics.items() if "/" not in k}
            row.update({k: _nan(v) for k, v in metrics.items()
                        if v is None or isinstance(v, (int, float))})
            rows.append(row)
            if r.data.tags.get("lfmodel.arm") != d["arm"]:
                for k in ("arm", "target_sparsity", "budget"):
                    client.set_tag(rid, f"lfmodel.{k}", str(d[k]))
            loss = _artifact_csv(client, rid, "train/loss.csv", tmp)
            val = _artifact_csv(client, rid, "train/val.csv", tmp)
            if loss is None:
                loss = pd.DataFrame([(m.step, m.value) for m in
                                     client.get_metric_history(rid, "loss/train")],
                                    columns=["step", "train_loss"])
            if val is None:
                val = pd.DataFrame([(m.step, m.value) for m in
                                    client.get_metric_history(rid, "loss/val")],
                                   columns=["step", "val_loss"])
            c = loss[["step", "train_loss"]].merge(val[["step", "val_loss"]], on="step",
                                                   how="outer")
            curves.append(c.assign(run_id=rid))
    return (pd.DataFrame(rows), pd.concat(curves, ignore_index=True) if curves else
            pd.DataFrame(columns=["run_id", "step", "train_loss", "val_loss"]), parent,
            diverged_points(kids, dmap))


def diverged_points(kids: list[Any], dmap: dict[str, dict]) -> pd.DataFrame:
    """The design points without a complete run whose newest run diverged (FAILED with tag
    lfmodel.diverged_at_step), one row each (report.DIVERGED_COLS). Such a point is a result
    of its arm, and is not run again (same params, device and threads: the same divergence);
    a new study id runs it afresh."""
    done = {r.data.tags.get("dvc.exp_name") for r in kids if run_complete(r)}
    rows, seen = [], set()
    for r in kids:  # newest first (children)
        name = r.data.tags.get("dvc.exp_name")
        if name not in dmap or name in done or name in seen:
            continue
        seen.add(name)  # the newest run of a name decides
        step = r.data.tags.get("lfmodel.diverged_at_step")
        if step is not None and r.info.status == "FAILED":
            d = dmap[name]
            rows.append({"run_id": r.info.run_id, "exp_name": name, "arm": d["arm"],
                         "target_sparsity": _nan(d["target_sparsity"]),
                         "budget": int(d["budget"]), "seed": int(d["seed"]),
                         "lambda_entropy": float(d["lambda_entropy"]),
                         "lambda_balance": float(d["lambda_balance"]),
                         "diverged_at_step": int(step)})
    return pd.DataFrame(rows, columns=list(report.DIVERGED_COLS))


def cost(client: Any, parent: str) -> tuple[float | None, float | None, str]:
    """Wall and CPU seconds summed over the study's invocations (metrics study.wall_s and
    study.cpu_s on the parent, at one step per invocation; its last value, see timed), and
    how CPU was counted."""
    def total(key: str) -> float | None:
        last: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(parent, key):
            if m.step not in last or m.timestamp >= last[m.step][0]:
                last[m.step] = (m.timestamp, m.value)
        return sum(v for _, v in last.values()) if last else None

    run = client.get_run(parent)
    basis = run.data.tags.get("lfmodel.study.cpu_basis", "not recorded")
    return total("study.wall_s"), total("study.cpu_s"), basis


@contextlib.contextmanager
def timed(client: Any, parent: str, study_id: str, cores: int | None,
          every: float = HEARTBEAT_S) -> Iterator[None]:
    """Log this invocation's wall (and cores x wall) seconds on the parent at step t0 in ms:
    every `every` seconds from a thread, and once more at the end however it ends. A study
    killed outright (SIGKILL, a lost machine) keeps its time up to the last beat."""
    t0 = time.time()
    stop = threading.Event()

    def log() -> None:
        wall = time.time() - t0
        client.log_metric(parent, "study.wall_s", wall, step=int(t0 * 1000))
        if cores:
            client.log_metric(parent, "study.cpu_s", cores * wall, step=int(t0 * 1000))

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a store that blips: the next beat logs
                log()

    if cores:
        client.set_tag(parent, "lfmodel.study.cpu_basis",
                       f"{cores} cores x wall (the runs do not record their process CPU)")
    thread = threading.Thread(target=beat, name="study-wall", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)  # a beat stuck in MLflow's retries: the store is not answering
        try:
            if thread.is_alive():
                raise RuntimeError("the tracking store does not answer")
            log()
        except Exception as err:  # noqa: BLE001 - the study's own error is what matters
            print(f"study {study_id}: wall time not logged: {err}", file=sys.stderr)
        print(f"study {study_id}: {(time.time() - t0) / 60:.1f} min wall this invocation",
              flush=True)


def write_report(study_id: str, experiment: str, out: Path = OUT,
                 n_resamples: int | None = None) -> Path:
    """reports/study/ from MLflow (report.build_report), plus cost.json."""
    runs, curves, parent, diverged = collect(study_id, experiment)
    if runs.empty:
        raise StudyError(f"study {study_id!r}: no complete runs under parent run {parent}")
    client, _ = get_client(experiment)
    wall, cpu, basis = cost(client, parent)
    kw = {} if n_resamples is None else {"n_resamples": n_resamples}
    try:
        out = report.build_report(runs, curves, out, wall_s=wall, cpu_s=cpu,
                                  diverged=diverged, **kw)
    except ValueError as err:
        raise StudyError(str(err)) from None
    (Path(out) / "cost.json").write_text(json.dumps(
        {"study_id": study_id, "parent_run_id": parent, "runs": len(runs), "wall_s": wall,
         "cpu_s": cpu, "cpu_basis": basis}, indent=1) + "\n")
    return Path(out)


def report_from_runs(runs_csv: Path, out: Path = OUT) -> Path:
    """reports/study/ again from a runs.csv that build_report wrote (its stability columns came
    from the curves), with diverged.csv and cost.json beside it: the statistics of the same
    runs after a change to lfmodel.stats or lfmodel.report, without the MLflow store."""
    runs_csv = Path(runs_csv)
    if not runs_csv.is_file():
        raise StudyError(f"--from-runs: no such file: {runs_csv}")
    runs = pd.read_csv(runs_csv)
    missing = [c for c in report.STABILITY if c not in runs.columns]
    if missing:
        raise StudyError(f"--from-runs: {runs_csv} lacks {missing}: not a runs.csv of a report")
    src = runs_csv.parent
    diverged = pd.read_csv(src / "diverged.csv") if (src / "diverged.csv").is_file() else None
    cost = (json.loads((src / "cost.json").read_text()) if (src / "cost.json").is_file()
            else {})
    try:
        out = report.build_report(runs, None, out, wall_s=cost.get("wall_s"),
                                  cpu_s=cost.get("cpu_s"), diverged=diverged)
    except ValueError as err:
        raise StudyError(str(err)) from None
    if cost:  # build_report clears the folder's .json files
        (Path(out) / "cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    return Path(out)


def print_verdicts(out: Path) -> None:
    """The answer where the command ends: verdict.md's claims and verdicts, without markdown."""
    for line in (Path(out) / "verdict.md").read_text().splitlines():
        if line.startswith(("## ", "- ")):
            print(line.removeprefix("## ").replace("**", ""))


# ---------------------------------------------------------------------------- running

def _sweep(study_id: str, points: Points, backend: str, jobs: int, address: str | None,
           experiment: str, lost: pd.DataFrame) -> list[str]:
    """One sweep of these points; the `lost` ones (diverged_points) are not run again."""
    if len(lost):
        print(f"study {study_id}: {len(lost)} point(s) diverged before and are not run again "
              f"(their arm's result, in diverged.csv): {', '.join(lost['exp_name'])}", flush=True)
    skip = frozenset(lost["exp_name"])
    if backend == "ray":
        return run_ray(study_id, points, address, experiment, skip=skip)
    return run_local(study_id, points, jobs, experiment, skip=skip)


def matched_phase(study_id: str, dmap: dict[str, dict], experiment: str) -> dict[str, dict]:
    """Phase 2: static at the sparsity the bare controller reached (mean over its complete 1x
    runs), same seeds and common overrides as the bare runs; {} (said why) when not asked or
    not possible yet."""
    bare = {n: d for n, d in dmap.items() if d["arm"] == "adaptive_bare" and d["budget"] == 1}
    if not bare:
        return {}
    runs, _, _, diverged = collect(study_id, experiment)
    done = runs[(runs["arm"] == "adaptive_bare") & (runs["budget"] == 1)] if len(runs) else runs
    lost = int(((diverged["arm"] == "adaptive_bare") & (diverged["budget"] == 1)).sum())
    if done.empty and lost:
        print(f"study {study_id}: every bare-controller run diverged ({lost} of {len(bare)}): "
              "no matched static", file=sys.stderr)
        return {}
    if len(done) + lost < len(bare):
        print(f"study {study_id}: matched static waits for every bare-controller run "
              f"({len(done)} of {len(bare)} complete, {lost} diverged)", file=sys.stderr)
        return {}
    reached = float(done["sparsity"].mean())  # over the runs that did not diverge
    one = next(iter(bare.values()))["sets"]
    common = {k: v for k, v in one.items() if not k.startswith("surge.")
              and k not in ("train.steps", "seed")}
    try:
        matched = arms.matched_static(reached, sorted({d["seed"] for d in bare.values()}),
                                      common=common)
    except ValueError:
        print(f"study {study_id}: bare controller reached sparsity {reached:.3f}: no matched "
              "static to run", file=sys.stderr)
        return {}
    print(f"study {study_id}: bare controller reached sparsity {reached:.3f}; phase 2: "
          f"{len(matched.points)} static runs at {round(reached, 2):g}", flush=True)
    return design_map(matched, study_id)


def run_study(study_id: str, design: arms.Design | None, backend: str = "local", jobs: int = 2,
              address: str | None = None, experiment: str | None = None,
              extra: dict[str, Any] | None = None, cores: int | None = None) -> list[str]:
    """Run (or resume) a study: the stored design if the id exists, else `design`; then the
    matched-static phase; log wall and CPU time on the parent. Returns the missing names."""
    experiment = experiment or load_params()["tracking"]["experiment"]
    client, exp_id = get_client(experiment)
    parent = find_parent(client, exp_id, study_id)
    dmap = stored_design(client, parent) if parent else {}
    if dmap:
        print(f"study {study_id}: resuming the design stored in parent run {parent} "
              f"({len(dmap)} points)", flush=True)
    elif design is None:
        raise StudyError(f"study {study_id!r} has no stored design to resume")
    else:
        dmap = design_map(design, study_id)
    phase1 = {n: d for n, d in dmap.items() if d["arm"] != "static_matched"}
    points = to_points(phase1, study_id, extra)
    try:
        check_grid(points, study_id)
        parent = parent_run(client, exp_id, study_id, points, backend)
    except SweepError as err:
        raise StudyError(str(err)) from None
    used = min(jobs, os.cpu_count() or 1) if backend == "local" else cores
    with timed(client, parent, study_id, used):
        store_design(client, parent, phase1)
        missing = _sweep(study_id, points, backend, jobs, address, experiment,
                         diverged_points(children(client, exp_id, parent), phase1))
        # a diverged point is its arm's result, not a lost record: phase 2 goes on without it
        kids = children(client, exp_id, parent)  # no run starts between here and phase 2
        if not set(missing) - set(diverged_points(kids, phase1)["exp_name"]):
            phase2 = matched_phase(study_id, phase1, experiment)
            if phase2:
                both = {**phase1, **phase2}
                store_design(client, parent, both)
                missing = _sweep(study_id, to_points(both, study_id, extra), backend, jobs,
                                 address, experiment, diverged_points(kids, both))
    return missing


# ---------------------------------------------------------------------------- command

def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    old = [a.split("=")[0] for a in argv if a.split("=")[0] in OLD_FLAGS]
    if old:
        print(f"study: {old[0]} was replaced by the study design (lfmodel.arms): "
              "`lfmodel study [--full] [--minutes M]`; a custom grid is `lfmodel sweep -S ...`",
              file=sys.stderr)
        raise SystemExit(2)
    ap = argparse.ArgumentParser(prog="lfmodel study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-id", default=STUDY_ID, help="sweep id; reuse it to resume")
    ap.add_argument("--full", action="store_true", help="arms.full_design (a cluster's)")
    ap.add_argument("--minutes", type=float, default=90.0, help="wall budget of the default "
                    "design on this machine's cores")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                    help="local: parallel runs (one torch thread each)")
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--from-runs", type=Path, metavar="RUNS_CSV",
                    help="rebuild reports/study/ from this runs.csv (and the diverged.csv and "
                    "cost.json beside it), without MLflow")
    args = ap.parse_args(argv)
    try:
        if not (args.minutes > 0 and math.isfinite(args.minutes)) or args.jobs <= 0:  # nan, inf
            raise StudyError("--minutes must be a positive number and --jobs positive")
        if args.from_runs:
            out = report_from_runs(args.from_runs)
            print(f"study: report -> {out}/ from {args.from_runs}")
            print_verdicts(out)
            return
        experiment = load_params()["tracking"]["experiment"]
        if not args.report_only:
            design = None
            client, exp_id = get_client(experiment)
            if not find_parent(client, exp_id, args.study_id):
                batch = DEFAULTS["train"]["batch_size"]
                if args.full:
                    design = arms.full_design(common={"train.batch_size": batch,
                                                      "train.threads": 1})
                else:
                    sps = calibrate(batch)
                    design, cpu, wall = arms.default_design(sps, batch, args.minutes,
                                                            args.jobs)
                    print(f"study {args.study_id}: measured {sps * 1000:.1f} ms CPU/step "
                          f"(batch {batch}, 1 thread); {len(design.points)} runs, predicted "
                          f"{cpu / 3600:.2f} CPU-h, ~{wall / 60:.0f} min on "
                          f"{args.jobs} cores", flush=True)
                for note in design.notes:
                    print(f"  design: {note}", flush=True)
            missing = run_study(args.study_id, design, args.backend, args.jobs, args.address,
                                experiment)
        else:
            missing = []
        out = write_report(args.study_id, experiment)
    except (StudyError, SweepError, ParamsError) as err:
        print(f"study: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"study {args.study_id}: report -> {out}/ (runs.csv, comparisons.md, verdict.md, ...)")
    print_verdicts(out)
    if missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
