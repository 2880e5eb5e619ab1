"""`collapse` (MaskSet.collapse / lowest_k: exact k-th value) against torch.quantile (issue 6.5).

On one prunable weight tensor of 2^20, 2^24 and 2^26 elements, to sparsity 0.5:
  collapse_s       MaskSet.collapse(0.5): scores, exact k-th value threshold, mask, zeroing
  quantile_s       the seed's way: torch.quantile threshold, mask, zeroing
  lowest_k_s / quantile_threshold_s: the threshold step alone, each way.
torch.quantile refuses inputs above 2^24 elements: that is recorded in an `error` field, not
raised. Times are medians of BENCH_REPEATS runs (weights restored between runs, untimed).
Prints one JSON line. Target: >= 5x faster where both run.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch  # noqa: E402
from _common import machine  # noqa: E402  (puts the repository on sys.path)
from torch import nn  # noqa: E402

from lfmodel.models import Monitored  # noqa: E402
from lfmodel.sparsity import MaskSet, lowest_k  # noqa: E402


class Big(Monitored):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n // 1024, 1024))


def timed(fn, reset, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def seed_collapse(p: torch.Tensor, sparsity: float) -> None:
    """The seed's collapse: quantile threshold of |w|, zero everything below it."""
    with torch.no_grad():
        a = p.abs()
        thr = torch.quantile(a.reshape(-1), sparsity)
        p.mul_(a >= thr)


def main() -> None:
    repeats = int(os.environ.get("BENCH_REPEATS", 3))
    threads = int(os.environ.get("BENCH_THREADS", 2))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = {}
    for log2 in (20, 24, 26):
        n = 2 ** log2
        model = nn.ModuleDict({"big": Big(n)})
        p = model["big"].weight
        init = p.detach().clone()
        masks = MaskSet(model)
        name = next(iter(masks.masks))

        def reset(masks=masks, name=name, p=p, init=init) -> None:
            masks.masks[name].fill_(True)
            masks.enabled = False
            with torch.no_grad():
                p.copy_(init)

        k = n // 2
        row: dict = {"elements": n}
        row["collapse_s"] = timed(lambda masks=masks: masks.collapse(0.5, "layer"), reset, repeats)
        assert abs(masks.sparsity() - 0.5) < 1e-6
        row["lowest_k_s"] = timed(lambda p=p, k=k: lowest_k(p.detach().abs(), k), reset, repeats)
        try:
            row["quantile_s"] = timed(lambda p=p: seed_collapse(p, 0.5), reset, repeats)
            row["quantile_threshold_s"] = timed(
                lambda p=p: torch.quantile(p.detach().abs().reshape(-1), 0.5), reset, repeats)
            row["speedup"] = row["quantile_s"] / row["collapse_s"]
            row["threshold_speedup"] = row["quantile_threshold_s"] / row["lowest_k_s"]
        except RuntimeError as err:
            row["error"] = f"torch.quantile: {err}".splitlines()[0][:200]
        results[f"2^{log2}"] = {k2: (round(v, 5) if isinstance(v, float) else v)
                                for k2, v in row.items()}
        print(f"collapse: 2^{log2}: {results[f'2^{log2}']}", file=sys.stderr, flush=True)
        del model, masks, p, init
    both = [r["speedup"] for r in results.values() if "speedup" in r]
    print(json.dumps({
        "bench": "collapse", "sparsity": 0.5, "repeats": repeats, "threads": threads,
        "sizes": results, "min_speedup": round(min(both), 3), "target": 5.0,
        "met": min(both) >= 5.0, "machine": machine(),
    }), flush=True)


if __name__ == "__main__":
    main()
