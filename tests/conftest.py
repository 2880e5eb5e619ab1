"""Shared fixtures: a tiny-params copy of the project in a temp git + DVC repo.

Tests that run `dvc` never touch the checkout: `dvc_repo` copies the tracked project files into
tmp_path, applies tiny params, then git init + dvc init + commit there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pyproject.toml", "lfmodel", "stages", ".gitignore",
                 "data/raw"]

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for in-process math tests: on 2 shared cores, two intra-op threads
    contending with other processes run ~50x slower; restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Small enough that a full `dvc repro` takes seconds of compute (imports dominate).
TINY = {
    "data": {"seq_len": 32, "n_train": 128, "n_val": 64, "n_test": 64},
    "model": {"d_model": 16, "expert_dim": 16, "adapt_dim": 8, "adapt_rank": 2, "hidden": 32},
    "train": {"steps": 30, "batch_size": 16, "eval_every": 10, "log_every": 5,
              "checkpoint_every": 10, "warmup_steps": 5, "threads": 1},
    "surge": {"collapse_every": 10, "surge_every": 20, "rigl_every": 5, "check_every": 5},
    "tracking": {"snapshot_every": 10},
}

GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(cmd: list[str] | str, cwd: Path, env: dict | None = None, check: bool = True,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command with the venv's bin first on PATH (dvc runs `python stages/...`)."""
    full_env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "PYTHONPATH": str(cwd)}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          shell=isinstance(cmd, str), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_repo(dest: Path, overrides: dict | None = None, tiny: bool = True) -> Path:
    """Copy the project to dest, write params, git init + dvc init + commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = merge(params, TINY) if tiny else params
    params = merge(params, overrides or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture
def dvc_repo(tmp_path: Path):
    """Factory: dvc_repo(overrides=None, name='repo') -> path of a committed tiny project."""

    def factory(overrides: dict | None = None, name: str = "repo", tiny: bool = True) -> Path:
        return make_repo(tmp_path / name, overrides, tiny)

    return factory
