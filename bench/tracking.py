"""Metrics logged per second into a SQLite MLflow store: sync vs the project's path (issue 6.5).

  sync   MlflowClient.log_metric once per metric (what a naive training loop does);
  async  lfmodel.tracking.Tracker.log_metrics (buffered; batches of up to 1000 sent with
         log_batch(synchronous=False)), then flush(wait=True): every metric stored.
Both write to a fresh SQLite store in a temp folder (the default store's kind), each into its
own run. Rates are medians over BENCH_REPEATS; `async_call_us_per_metric` is what the training
loop itself pays per metric (the log_metrics calls, without the final flush).
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine  # noqa: E402  (puts the repository on sys.path)


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", 3))
    n_sync = int(os.environ.get("BENCH_SYNC_METRICS", 300))
    steps, per_step = int(os.environ.get("BENCH_ASYNC_STEPS", 1000)), 20
    tmp = Path(tempfile.mkdtemp(prefix="lfmodel-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(tmp)
    from lfmodel.tracking import Tracker, get_client

    client, exp_id = get_client("bench-tracking")
    sync_rates, async_rates, call_us = [], [], []
    for r in range(repeats):
        run_id = client.create_run(exp_id).info.run_id
        t0 = time.perf_counter()
        for i in range(n_sync):
            client.log_metric(run_id, f"m{i % per_step}", float(i), step=i // per_step)
        sync_rates.append(n_sync / (time.perf_counter() - t0))

        tracker = Tracker(client, client.create_run(exp_id).info.run_id, "bench")
        t0 = time.perf_counter()
        for s in range(steps):
            tracker.log_metrics({f"m{j}": float(s * per_step + j) for j in range(per_step)}, s)
        t1 = time.perf_counter()
        tracker.flush(wait=True)
        t2 = time.perf_counter()
        n = steps * per_step
        stored = len(client.get_metric_history(tracker.run_id, "m0"))
        assert stored == steps, (stored, steps)
        async_rates.append(n / (t2 - t0))
        call_us.append(1e6 * (t1 - t0) / n)
        print(f"tracking: repeat {r + 1}/{repeats}: sync {sync_rates[-1]:.0f}/s, "
              f"async {async_rates[-1]:.0f}/s", file=sys.stderr, flush=True)
    sync, asyn = statistics.median(sync_rates), statistics.median(async_rates)
    print(json.dumps({
        "bench": "tracking", "store": "sqlite (temp file)", "repeats": repeats,
        "sync_metrics": n_sync, "async_metrics": steps * per_step,
        "sync_metrics_per_s": round(sync, 1), "async_metrics_per_s": round(asyn, 1),
        "ratio": round(asyn / sync, 2),
        "async_call_us_per_metric": round(statistics.median(call_us), 2),
        "machine": machine(torch_threads=False),
    }), flush=True)


if __name__ == "__main__":
    main()
