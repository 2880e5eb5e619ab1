"""The update of a training step on the default model: lfmodel.optim against torch (issue 12).

On the default LFModel's parameters (67 tensors) with fixed random gradients: Adam (torch's
default foreach implementation, torch's fused=True, lfmodel.optim.Adam: the fused kernel
stepped directly) and gradient clipping (nn.utils.clip_grad_norm_ per parameter and with
foreach=True, lfmodel.optim.clip_grad_norm_). Clipping at a max_norm the gradients never
reach and Adam at lr 1e-9 leave the numbers (nearly) where they are, so every call does the
same work. Milliseconds per call: median over BENCH_REPEATS (15) blocks of 200 calls, all
variants interleaved in every block; ratios against torch's fused Adam and foreach clipping.
BENCH_THREADS (default 1). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from _common import ROOT, machine  # noqa: E402  (puts the repository on sys.path)
from torch import nn  # noqa: E402

from lfmodel import optim  # noqa: E402
from lfmodel.config import load_params  # noqa: E402
from lfmodel.models import build_model  # noqa: E402

CALLS = 200


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    repeats = int(os.environ.get("BENCH_REPEATS", 15))
    params = load_params(ROOT / "params.yaml")
    torch.manual_seed(params["seed"])
    ps = list(build_model(params["model"], params["data"]["vocab_size"]).parameters())
    for p in ps:
        p.grad = torch.randn_like(p)
    adams = {"adam_torch_foreach": torch.optim.Adam(ps, lr=1e-9),
             "adam_torch_fused": torch.optim.Adam(ps, lr=1e-9, fused=True),
             "adam_lfmodel": optim.Adam(ps, lr=1e-9, weight_decay=0.0)}
    for opt in adams.values():  # state created; lfmodel's counters shared from the second
        opt.step()
        opt.step()
    fns = {**{k: opt.step for k, opt in adams.items()},
           "clip_torch_per_parameter": lambda: nn.utils.clip_grad_norm_(ps, 1e9, foreach=False),
           "clip_torch_foreach": lambda: nn.utils.clip_grad_norm_(ps, 1e9, foreach=True),
           "clip_lfmodel": lambda: optim.clip_grad_norm_(ps, 1e9)}
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            per[k].append((time.perf_counter() - t0) / CALLS * 1000)
    ms = {f"{k}_ms": round(statistics.median(v), 3) for k, v in per.items()}
    print(json.dumps({
        "bench": "optim_step", "tensors": len(ps), "numel": sum(p.numel() for p in ps),
        "calls_per_block": CALLS, "repeats": repeats, **ms,
        "adam_speedup_vs_torch_fused": round(ms["adam_torch_fused_ms"] / ms["adam_lfmodel_ms"], 2),
        "clip_speedup_vs_torch_foreach": round(
            ms["clip_torch_foreach_ms"] / ms["clip_lfmodel_ms"], 2),
        "machine": machine(),
    }), flush=True)


if __name__ == "__main__":
    main()
