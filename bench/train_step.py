"""Training step of the default LFModel: the package model against the frozen reference copy of
today's forward (bench/reference_lfm.py), in one process, on the same inputs (issue 12).

A step is forward (with gates) + task loss + lambda_entropy * gate entropy + backward + grad
clip + Adam, with params.yaml's defaults (batch 32, seq 64, d_model 64, 4 experts, expert_dim
64). Sides, interleaved in every repeat so that a shared machine's load hits them alike: `ref`
(reference model, today's Adam), `new` (package model, the same Adam: the model's own
speed-up), `new_fused` (package model, the Trainer's update: lfmodel.optim's Adam, the fused
kernel stepped directly, and its clipping: what the step gains from the optimizer too; the step
the Trainer runs, on which the targets are judged), `matmul` (a 1024^3 fp32 matmul: the
machine's reference FLOP/s at the same thread count) and `own_matmuls` (the matmuls of one
new_fused step, forward and backward, replayed alone on random operands of the same shapes: the
rate this model's small, skinny matmuls reach at best, a realistic ceiling for the step). Times
are medians over BENCH_REPEATS blocks of BENCH_STEPS steps; speed-ups are medians of the
per-block ratios; each figure twice, by wall clock and by process CPU time (`cpu_`, which a
machine shared with other jobs inflates less).
FLOPs per step are model FLOPs: torch's FlopCounterMode on one reference step (the math as
defined, whatever the implementation skips or adds); `new_counted` is the same count on the
package model (its block-diagonal weights multiply some zeros).
Every step takes the next of BATCHES batches of the default data (every side the same ones, in
the same order). Not one fixed batch: a model fitting one batch for hundreds of steps saturates
its gates and fills its backward with subnormal floats, which x86 computes slowly, so both
sides slowed down block after block (1 thread, the package model: 34 -> 41 -> 51 ms over three
runs of 145 steps), unlike a real run (the Trainer on the default data: 20.6-23.1 ms per step
at 2 threads, means over 100 steps, from the first step to the 1,000th).
Before timing, outputs, gates and gradients of both models (the same weights: the package's
stacked expert parameters split per expert for the reference) must agree to
1e-5. BENCH_THREADS=1 or 2 runs one thread count (default: both). Prints one JSON line.
Targets: speed-up >= 2 at 1 and at 2 threads, step FLOP/s >= 50 % of matmul FLOP/s.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import ROOT, machine  # noqa: E402  (puts the repository on sys.path)
from reference_lfm import LFModel as ReferenceLFModel  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lfmodel.config import load_params  # noqa: E402
from lfmodel.data import build  # noqa: E402
from lfmodel.entropy import regularized_loss  # noqa: E402
from lfmodel.models import build_model  # noqa: E402
from lfmodel.models.lfm import per_expert_state  # noqa: E402
from lfmodel.optim import Adam, clip_grad_norm_  # noqa: E402

MATMUL_N = 1024
BATCHES = 64
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
TOL = 1e-5


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: dict) -> torch.Tensor:
    out, gates = model(x, return_gates=True)
    task = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return regularized_loss(task, gates, t["lambda_entropy"], t["lambda_balance"])[0]


def default_batches(params: dict, n: int = BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n training batches of the default data (lfmodel.data, as the prepare stage builds it),
    drawn as the Trainer draws them: the regime a real run's steps are in."""
    train = build(params["data"], params["seed"], base=ROOT)[0]["train"]
    x, y = torch.as_tensor(train["inputs"]), torch.as_tensor(train["targets"])
    g = torch.Generator().manual_seed(params["seed"])
    draws = (torch.randint(0, x.shape[0], (params["train"]["batch_size"],), generator=g)
             for _ in range(n))
    return [(x[i], y[i]) for i in draws]


def step(model: nn.Module, opt: torch.optim.Optimizer, x, y, t: dict, trainer: bool = False
         ) -> None:
    """One step; `trainer`: clipped as the Trainer clips (lfmodel.optim), else as before
    issue 12."""
    loss = loss_of(model, x, y, t)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if trainer:
        clip_grad_norm_(opt.param_groups[0]["params"], t["grad_clip"])
    else:
        nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
    opt.step()


def max_diffs(new: nn.Module, ref: nn.Module, x, y, t: dict) -> dict:
    """Largest |new - ref| over outputs and gates, and over every parameter's gradient."""
    (o1, g1), (o0, g0) = new(x, return_gates=True), ref(x, return_gates=True)
    out = max((a - b).abs().max().item() for a, b in zip([o1, *g1], [o0, *g0], strict=True))
    d1, d0 = (per_expert_state(dict(zip(
        [n for n, _ in m.named_parameters()],
        torch.autograd.grad(loss_of(m, x, y, t), list(m.parameters())), strict=True)))
        for m in (new, ref))
    assert d1.keys() == d0.keys()
    grad = max((d1[n] - d0[n]).abs().max().item() for n in d0)
    return {"out_max_abs": out, "grad_max_abs": grad}


def flops(model: nn.Module, x, y, t: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_of(model, x, y, t).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemms(fn) -> list[tuple[str, list[list[int]]]]:
    """The matmuls one call of fn runs (forward and backward), with their input shapes."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events() if e.name in GEMM_OPS]


def replay(calls: list[tuple[str, list[list[int]]]]) -> tuple[Callable[[], None], int]:
    """A function running the same matmuls alone on contiguous random operands, and their FLOPs:
    the rate the step's own (small, skinny) matmuls reach, its realistic ceiling."""
    ops, total = [], 0
    for name, shapes in calls:
        if name == "aten::addmm":
            bias, a, b = (torch.randn(*sh) for sh in shapes[:3])
            ops.append(lambda bias=bias, a=a, b=b: torch.addmm(bias, a, b))
        else:
            a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
            ops.append(lambda a=a, b=b, f=torch.bmm if name == "aten::bmm" else torch.mm: f(a, b))
        a_shape, b_shape = shapes[-2:] if name != "aten::addmm" else shapes[1:3]
        total += 2 * math.prod(a_shape) * b_shape[-1]

    def run_all() -> None:
        for op in ops:
            op()
    return run_all, total


def timed(fn, n: int) -> tuple[float, float]:
    """Seconds per call of fn over n calls: wall clock, and process CPU time (all threads; a
    loaded machine inflates it less than wall time, since waiting for a core costs none)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


def run(threads: int, sides: dict, steps: int, repeats: int, step_flops: int,
        own: tuple) -> dict:
    torch.set_num_threads(threads)
    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    fns = {**sides, "matmul": lambda: torch.mm(a, b), "own_matmuls": own[0]}
    for fn in fns.values():   # warm-up: allocator, thread pool, first-call costs
        timed(fn, 3)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w, c = timed(fn, steps if k != "matmul" else max(3, steps // 4))
            wall[k].append(w)
            cpu[k].append(c)
    out: dict = {}
    for clock, per in (("", wall), ("cpu_", cpu)):
        med = {k: statistics.median(v) for k, v in per.items()}
        mm_flops = 2 * MATMUL_N ** 3 / med["matmul"]
        out.update({f"{clock}{k}_ms": round(1000 * med[k], 2) for k in sides})
        own_flops = own[1] / med["own_matmuls"]
        out[f"{clock}own_matmuls_ms"] = round(1000 * med["own_matmuls"], 2)
        out[f"{clock}own_matmuls_gflops"] = round(own_flops / 1e9, 1)
        for k in sides:
            if k != "ref":  # median of the per-block ratios: a load burst hits one block
                out[f"{clock}speedup_{k}"] = round(statistics.median(
                    r / n for r, n in zip(per["ref"], per[k], strict=True)), 3)
        out[f"{clock}matmul_gflops"] = round(mm_flops / 1e9, 1)
        for k in sides:
            out[f"{clock}{k}_fraction_of_matmul"] = round(step_flops / med[k] / mm_flops, 3)
        out[f"{clock}own_matmuls_fraction_of_matmul"] = round(own_flops / mm_flops, 3)
    return out


def main() -> None:
    steps = int(os.environ.get("BENCH_STEPS", 20))
    repeats = int(os.environ.get("BENCH_REPEATS", 7))
    thread_counts = ([int(os.environ["BENCH_THREADS"])] if "BENCH_THREADS" in os.environ
                     else [1, 2])
    params = load_params(ROOT / "params.yaml")
    p, tr, data = params["model"], params["train"], params["data"]
    t = {"lambda_entropy": params["lambda_entropy"], "lambda_balance": tr["lambda_balance"],
         "grad_clip": tr["grad_clip"]}
    vocab = data["vocab_size"]
    torch.manual_seed(params["seed"])
    new = build_model(p, vocab)
    ref = ReferenceLFModel(vocab, **{k: p[k] for k in (
        "d_model", "num_layers", "num_experts", "expert_dim", "adapt_dim", "adapt_rank")})
    ref.load_state_dict(per_expert_state(new.state_dict()))
    new_fused = copy.deepcopy(new)
    batches = default_batches(params)
    x, y = batches[0]

    torch.set_num_threads(1)
    diffs = max_diffs(new, ref, x, y, t)
    equal = max(diffs.values()) <= TOL
    step_flops = flops(ref, x, y, t)
    new_counted = flops(new, x, y, t)

    adam = {"lr": tr["lr"], "weight_decay": tr["weight_decay"]}
    opts = {"ref": torch.optim.Adam(ref.parameters(), **adam),
            "new": torch.optim.Adam(new.parameters(), **adam),
            "new_fused": Adam(new_fused.parameters(), **adam)}
    models = {"ref": ref, "new": new, "new_fused": new_fused}
    feeds = {k: itertools.cycle(batches) for k in models}  # each side: the same batches in turn
    sides = {k: (lambda k=k: step(models[k], opts[k], *next(feeds[k]), t, k == "new_fused"))
             for k in models}
    probe = copy.deepcopy(new_fused)  # a copy, so that every side starts at the same step and batch
    probe_opt = Adam(probe.parameters(), **adam)
    own = replay(gemms(lambda: step(probe, probe_opt, x, y, t, True)))
    results = {str(n): run(n, sides, steps, repeats, step_flops, own) for n in thread_counts}
    met = equal and all(r["speedup_new_fused"] >= 2 and r["new_fused_fraction_of_matmul"] >= 0.5
                        for r in results.values())
    print(json.dumps({
        "bench": "train_step",
        "config": {"batch_size": tr["batch_size"], "seq_len": data["seq_len"], "vocab": vocab,
                   **{k: p[k] for k in ("d_model", "num_layers", "num_experts", "expert_dim",
                                        "adapt_dim", "adapt_rank")}},
        "steps_per_block": steps, "repeats": repeats,
        "equal": {**{k: float(f"{v:.3g}") for k, v in diffs.items()}, "tol": TOL, "ok": equal},
        "model_gflop_per_step": round(step_flops / 1e9, 3),
        "new_counted_gflop_per_step": round(new_counted / 1e9, 3),
        "own_matmuls_gflop_per_step": round(own[1] / 1e9, 3),
        "threads": results,
        "targets": {"speedup_new_fused": 2.0, "new_fused_fraction_of_matmul": 0.5}, "met": met,
        "machine": machine(),
    }), flush=True)


if __name__ == "__main__":
    main()
