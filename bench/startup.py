"""Fixed cost of each pipeline stage (issue 12): what a stage process spends besides its work.

Per stage, a fresh interpreter runs `import stages.<name>`, for the stages that log (train and
evaluate; prepare and trace log nothing) opens the MLflow client on an existing SQLite store
(lfmodel.tracking.get_client, as stage_run does), and exits as a stage does (stage_main's
exit_fast: threads joined, atexit handlers run, the interpreter's teardown skipped). Wall time
from outside the process, so start-up and exit are both in it; median of BENCH_REPEATS (5).
The same processes ending with the interpreter's full teardown (a plain exit, as stages did
before) run interleaved as the baseline. One JSON line: seconds per stage and their sum, for
both (target: sum <= 8 s on the 2-core machine).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine

STAGES = {"prepare": False, "train": True, "trace": False, "evaluate": True}  # logs to MLflow?
EXPERIMENT = "startup-bench"


def code(stage: str, logs: bool, teardown: bool = False) -> str:
    opens = f"; from lfmodel.tracking import get_client; get_client({EXPERIMENT!r})" if logs else ""
    ends = "" if teardown else "; from lfmodel.config import exit_fast; exit_fast(0)"
    return f"import stages.{stage}{opens}{ends}"


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", "5"))
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": tmp,
               "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
        # the store exists before timing: creating its schema is a once-per-repo cost
        subprocess.run([sys.executable, "-c", code("train", True)], cwd=ROOT, env=env,
                       check=True, capture_output=True)
        seconds, teardown = {}, {}
        for stage, logs in STAGES.items():
            runs = {True: [], False: []}
            for _ in range(repeats):
                for full in (False, True):
                    runs[full].append(timed([sys.executable, "-c", code(stage, logs, full)], env))
            seconds[stage] = round(statistics.median(runs[False]), 3)
            teardown[stage] = round(statistics.median(runs[True]), 3)
    print(json.dumps({"bench": "startup", "seconds": seconds,
                      "sum_s": round(sum(seconds.values()), 3), "target_sum_s": 8.0,
                      "with_teardown": teardown,
                      "with_teardown_sum_s": round(sum(teardown.values()), 3),
                      "repeats": repeats, "machine": machine(torch_threads=False)}))


if __name__ == "__main__":
    main()
