"""Sweep throughput on one Ray node vs two (one CPU each), same small grid: one JSON line.

    BENCH_POINTS=4 python bench/sweep_scaling.py

Builds a temp project (tiny params, bare git origin, local DVC remote), starts `lfmodel server`
and a Ray head (`ray start --head --block`, 1 CPU), runs the grid, adds a second node
(`ray start --address --block`, 1 CPU), runs the same grid under a new sweep id, and reports
experiments per minute for both and their ratio (goal >= 1.7x). Every process it starts is
stopped by process group, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import ROOT, machine  # puts the repository on sys.path

from lfmodel.server import RAY_DEFAULT_PORTS, free_port

BIN = Path(sys.executable).parent

TINY = {"data": {"seq_len": 32, "n_train": 128, "n_val": 64, "n_test": 64},
        "model": {"d_model": 16, "expert_dim": 16, "adapt_dim": 8, "adapt_rank": 2, "hidden": 32},
        "train": {"steps": 30, "batch_size": 16, "eval_every": 10, "log_every": 5,
                  "checkpoint_every": 10, "warmup_steps": 5, "threads": 1}}
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "b",
       "GIT_AUTHOR_EMAIL": "b@localhost", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@localhost", "RAY_USAGE_STATS_ENABLED": "0"}


def sh(*cmd: str, cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def project(tmp: Path) -> Path:
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "pyproject.toml", "lfmodel", "stages", ".gitignore", "data/raw"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for k, v in TINY.items():
        params[k] = {**params.get(k, {}), **v}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=repo)
    sh("git", "init", "-q", "--bare", str(tmp / "origin.git"), cwd=tmp)
    sh("git", "remote", "add", "origin", str(tmp / "origin.git"), cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "store", str(tmp / "dvcstore"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "bench", cwd=repo)
    return repo


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ENV,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for(pred, what: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Until pred() holds; stops at once, with the last line of its log, if proc has exited."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            lines = log.read_text().strip().splitlines() or ["(no output)"]
            raise SystemExit(f"sweep_scaling: {what} exited ({proc.returncode}): {lines[-1]}")
        time.sleep(1)
    raise SystemExit(f"sweep_scaling: {what} not ready after {seconds:.0f} s (log: {log})")


def cpus(address: str) -> str:
    return subprocess.run([str(BIN / "ray"), "status", "--address", address], env=ENV,
                          capture_output=True, text=True).stdout


def sweep(repo: Path, uri: str, address: str, name: str, points: int) -> float:
    t0 = time.time()
    subprocess.run([str(BIN / "lfmodel"), "sweep", "--seeds", f"0-{points - 1}", "--name", name,
                    "--backend", "ray", "--address", address], cwd=repo,
                   env={**ENV, "MLFLOW_TRACKING_URI": uri}, check=True, capture_output=True)
    return points / ((time.time() - t0) / 60)


def main() -> None:
    points = int(os.environ.get("BENCH_POINTS", "4"))
    tmp = Path(tempfile.mkdtemp(prefix="sweep_scaling_"))
    procs: list[subprocess.Popen] = []
    try:
        repo = project(tmp)
        port, ray_port = free_port(), free_port(avoid=RAY_DEFAULT_PORTS)
        procs.append(start([str(BIN / "lfmodel"), "server", "--data", str(tmp / "srv"), "--port",
                            str(port)], tmp / "server.log"))
        uri = f"http://127.0.0.1:{port}"
        wait_for(lambda: (tmp / "srv" / "server.json").exists(), "lfmodel server", procs[-1],
                 tmp / "server.log")
        address = f"127.0.0.1:{ray_port}"
        common = ["--block", "--num-cpus", "1", "--object-store-memory", "80000000",
                  "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        procs.append(start([str(BIN / "ray"), "start", "--head", "--port", str(ray_port),
                            "--include-dashboard", "false", "--temp-dir", f"/tmp/ray_b_{ray_port}",
                            *common], tmp / "head.log"))
        wait_for(lambda: "/1.0 CPU" in cpus(address), "Ray head", procs[-1], tmp / "head.log")
        one = sweep(repo, uri, address, "one", points)
        procs.append(start([str(BIN / "ray"), "start", "--address", address, *common],
                           tmp / "worker.log"))
        wait_for(lambda: "/2.0 CPU" in cpus(address), "Ray worker", procs[-1], tmp / "worker.log")
        two = sweep(repo, uri, address, "two", points)
        print(json.dumps({"bench": "sweep_scaling", "points": points,
                          "exp_per_min_1node": round(one, 3), "exp_per_min_2nodes": round(two, 3),
                          "ratio": round(two / one, 3), "goal": 1.7, "machine": machine()}))
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
