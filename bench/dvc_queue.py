"""Four queued experiments at `dvc queue start -j 2` against the same four run one after
another, default params (train.threads 0): one JSON line.

    BENCH_STEPS=1000 python bench/dvc_queue.py     # train.steps of every experiment (default: params)

Builds a temp copy of the project (git + DVC, prepare run once so neither side pays for it),
then times `dvc exp run` four times in a row (sequential) and four `dvc exp run --queue`
followed by `dvc queue start -j 2` until all four are done (parallel). The experiments differ
only in `seed`. Goal (issue 12): the parallel queue is not slower than the sequence, i.e.
ratio = sequential_s / parallel_s >= 1. Each side's trains record the thread count they chose
(MLflow tag lfmodel.threads_used), listed in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine  # puts the repository on sys.path

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "b",
       "GIT_AUTHOR_EMAIL": "b@localhost", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@localhost"}
ENV.pop("MLFLOW_TRACKING_URI", None)
FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "lfmodel", "stages", ".gitignore", "data/raw"]


def sh(*cmd: str, cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"queue bench: {' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def project(tmp: Path) -> Path:
    repo = tmp / "project"
    repo.mkdir()
    for name in FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "bench", cwd=repo)
    sh("dvc", "repro", "prepare", cwd=repo)  # shared by both sides
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "prepared", cwd=repo)
    return repo


def sets(seed: int, steps: str | None) -> list[str]:
    out = ["-S", f"seed={seed}"]
    return out + (["-S", f"train.steps={steps}"] if steps else [])


def threads_used(repo: Path, prefix: str) -> list[int]:
    """The thread counts the trains of experiments named prefix* chose (MLflow tags)."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute("select r.name, t.value from runs r join tags t on r.run_uuid = "
                          "t.run_uuid where t.key = 'lfmodel.threads_used'").fetchall()
    return [int(v) for name, v in sorted(rows) if name.startswith(prefix)]


def main() -> None:
    steps = os.environ.get("BENCH_STEPS")
    with tempfile.TemporaryDirectory(prefix="lfmodel-queue-") as tmp:
        repo = project(Path(tmp))
        t0 = time.perf_counter()
        for seed in range(4):
            sh("dvc", "exp", "run", "-n", f"seq{seed}", *sets(seed, steps), cwd=repo)
        sequential = time.perf_counter() - t0
        for seed in range(4):
            sh("dvc", "exp", "run", "--queue", "-n", f"par{seed}", *sets(10 + seed, steps), cwd=repo)
        t0 = time.perf_counter()
        sh("dvc", "queue", "start", "-j", "2", cwd=repo)
        while True:
            status = sh("dvc", "queue", "status", cwd=repo)
            if not any(w in status for w in ("Queued", "Running")):
                break
            time.sleep(2)
        parallel = time.perf_counter() - t0
        failed = status.count("Failed")
        sh("dvc", "queue", "stop", cwd=repo)
        seq_threads, par_threads = threads_used(repo, "seq"), threads_used(repo, "par")
    print(json.dumps({
        "bench": "queue", "experiments": 4, "jobs": 2, "train.steps": steps or "params",
        "sequential_s": round(sequential, 1), "parallel_s": round(parallel, 1),
        "ratio": round(sequential / parallel, 3), "failed": failed,
        "threads_used": {"sequential": seq_threads, "parallel": par_threads},
        "machine": machine(torch_threads=False)}))


if __name__ == "__main__":
    main()
