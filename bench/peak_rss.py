"""Peak resident memory (RSS) of the default `train` stage (issue 6.5).

Copies the project into a temp folder, runs `stages/prepare.py` with the default params, then
`stages/train.py` with the default params except `train.steps` (BENCH_RSS_STEPS, default 200,
with checkpoint_every 100 so a checkpoint is written; memory is flat after the first steps:
the same tensors are allocated every step). Each stage runs as a child process that reports
its own ru_maxrss; the baseline, measured the same way, is a child that only imports what the
stage imports (torch, mlflow, pandas, lfmodel): the ratio is the stage's peak over that floor.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import ROOT, machine

# rss.json is written by an atexit handler: a finished stage ends through config.exit_fast
# (atexit handlers run, then os._exit), so nothing after run_path runs on success.
PROBE = r"""
import atexit, json, resource, runpy, sys
target = sys.argv[1]
state = {"code": 0}

def report():
    with open("rss.json", "w") as f:
        json.dump({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "code": state["code"]}, f)

atexit.register(report)
if target == "imports":
    import mlflow, pandas, torch  # noqa
    import lfmodel.training, lfmodel.tracking, lfmodel.checkpoint, lfmodel.models  # noqa
    from mlflow.tracking import MlflowClient  # noqa
else:
    sys.argv = [target]
    try:
        runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        state["code"] = e.code or 0
"""




def peak_mb(cwd: Path, target: str, env: dict) -> float:
    proc = subprocess.run([sys.executable, "-c", PROBE, target], cwd=cwd, env=env,
                          capture_output=True, text=True)
    out = json.loads((cwd / "rss.json").read_text()) if (cwd / "rss.json").exists() else None
    if proc.returncode != 0 or out is None or out["code"] != 0:
        raise SystemExit(f"peak_rss: {target} failed:\n{proc.stdout}\n{proc.stderr}")
    (cwd / "rss.json").unlink()
    return out["maxrss_kb"] / 1024


def main() -> None:
    steps = int(os.environ.get("BENCH_RSS_STEPS", 200))
    tmp = Path(tempfile.mkdtemp(prefix="lfmodel-bench-"))
    for name in ("lfmodel", "stages", "params.yaml"):
        src = ROOT / name
        (shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy2(src, tmp / name))
    params = yaml.safe_load((tmp / "params.yaml").read_text())
    params["train"]["steps"] = steps
    params["train"]["checkpoint_every"] = min(params["train"]["checkpoint_every"], steps // 2)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PYTHONPATH"] = str(tmp)
    floor = peak_mb(tmp, "imports", env)
    prepare = peak_mb(tmp, "stages/prepare.py", env)
    print(f"peak_rss: imports {floor:.0f} MB, prepare {prepare:.0f} MB; training {steps} steps",
          file=sys.stderr, flush=True)
    train = peak_mb(tmp, "stages/train.py", env)
    n_params = sum(
        v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(tmp / "data/model/model.safetensors")).values())
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "bench": "peak_rss", "stage": "train", "params": "params.yaml defaults",
        "train_steps": steps, "default_steps": yaml.safe_load(
            (ROOT / "params.yaml").read_text())["train"]["steps"],
        "model_parameters": n_params,
        "train_peak_rss_mb": round(train, 1), "prepare_peak_rss_mb": round(prepare, 1),
        "import_floor_rss_mb": round(floor, 1), "ratio_to_import_floor": round(train / floor, 3),
        "machine": machine(torch_threads=False),
    }), flush=True)


if __name__ == "__main__":
    main()
