"""Train-step overhead of the full instrumentation against a bare PyTorch loop (issue 6.5).

Same model (same init), same data (the default `regimes` data), same objective (task loss +
lambda_entropy * gate entropy), same Adam / lr schedule / grad clip / validation cadence. The
instrumented side is the train stage's Trainer with every hook it uses: the adaptive
controller (interval schedule if lfmodel.sparsity.controller is missing) with its masks and entropy
monitoring, curves, MLflow logging (Tracker into a temp SQLite store) and checkpoints.
The two sides are interleaved finely, so that the load of a shared machine hits both alike: one
instrumented `fit` runs BENCH_REPEATS * BENCH_STEPS steps, and a last hook (`Interleave`), every
BENCH_CHUNK (5) steps, stops the instrumented clocks, runs as many bare steps on their own
clocks, and restarts them. Each side keeps training its own model. `ratio` is the median over
windows of BENCH_STEPS steps (whole monitor / controller / eval / checkpoint cycles) of
instrumented over bare wall time; `ratio_cpu` the same with process CPU time (all threads, the
MLflow sender included), which a busy shared machine disturbs less.
Threads: train.threads from params.yaml unless BENCH_THREADS is set. On a machine whose cores
are shared with other jobs, 2 intra-op threads can stall for seconds per step waiting for a
descheduled sibling, whatever the loop: use BENCH_THREADS=1 there.
Prints one JSON line. Target: ratio <= 1.05 at the default config.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402
from _common import ROOT, machine  # noqa: E402  (puts the repository on sys.path)
from torch import nn  # noqa: E402

from lfmodel.checkpoint import Checkpointer  # noqa: E402
from lfmodel.config import load_params  # noqa: E402
from lfmodel.curves import CurvesHook  # noqa: E402
from lfmodel.data import prepare_regimes  # noqa: E402
from lfmodel.entropy import regularized_loss  # noqa: E402
from lfmodel.models import build_model  # noqa: E402
from lfmodel.sparsity import build_schedule  # noqa: E402
from lfmodel.training import TrainConfig, Trainer, seed_everything, task_loss  # noqa: E402


class BareLoop:
    """The training recipe with nothing around it."""

    def __init__(self, model: nn.Module, train: dict, val: dict, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.x, self.y, self.val = train["inputs"], train["targets"], val
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.warmup_steps and step <= c.warmup_steps:
            return c.lr * step / c.warmup_steps
        t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
        return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def run(self, n: int) -> None:
        c = self.cfg
        for _ in range(n):
            self.step += 1
            self.model.train()
            idx = torch.randint(0, self.x.shape[0], (c.batch_size,), generator=self.gen)
            out, gates = self.model(self.x[idx], return_gates=True)
            loss, _ = regularized_loss(task_loss(out, self.y[idx]), gates, c.lambda_entropy,
                                       c.lambda_balance)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            self.opt.step()
            if self.step % c.eval_every == 0:  # same validation work as the trainer
                with torch.no_grad():
                    self.model.eval()
                    vx, vy = self.val["inputs"], self.val["targets"]
                    for i in range(0, vx.shape[0], 256):
                        float(task_loss(self.model(vx[i:i + 256]), vy[i:i + 256]))


def main() -> None:
    steps = int(os.environ.get("BENCH_STEPS", 100))
    repeats = int(os.environ.get("BENCH_REPEATS", 5))
    params = load_params(ROOT / "params.yaml")
    has_controller = importlib.util.find_spec("lfmodel.sparsity.controller") is not None
    params["surge"]["mode"] = "adaptive" if has_controller else "interval"
    params["train"]["steps"] = steps * repeats
    if "BENCH_THREADS" in os.environ:
        params["train"]["threads"] = int(os.environ["BENCH_THREADS"])
    seed_everything(params["seed"], params["train"]["threads"])
    splits, meta = prepare_regimes(params["data"], params["seed"])
    train, val = ({k: torch.as_tensor(a) for k, a in splits[s].items()} for s in ("train", "val"))
    cfg = TrainConfig.from_params(params)
    model = build_model(params["model"], meta["vocab_size"])
    bare = BareLoop(copy.deepcopy(model), train, val, cfg)

    tmp = Path(tempfile.mkdtemp(prefix="lfmodel-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.chdir(tmp)
    from lfmodel.tracking import MLflowHook, stage_run

    class Interleave:
        """Last hook: every `chunk` steps, pause the instrumented clock and run bare steps."""

        def __init__(self, chunk: int, window: int) -> None:
            self.chunk, self.window = chunk, window
            self.instr = self.bare = self.instr_cpu = self.bare_cpu = 0.0
            self.pairs: list[tuple[float, float]] = []
            self.cpu_pairs: list[tuple[float, float]] = []
            self.start()

        def start(self) -> None:
            self.mark, self.mark_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
            if step % self.chunk:
                return
            t0, c0 = time.perf_counter(), time.process_time()
            self.instr += t0 - self.mark
            self.instr_cpu += c0 - self.mark_cpu
            bare.run(self.chunk)
            self.start()
            self.bare += self.mark - t0
            self.bare_cpu += self.mark_cpu - c0
            if step % self.window == 0:
                self.pairs.append((self.bare, self.instr))
                self.cpu_pairs.append((self.bare_cpu, self.instr_cpu))
                print(f"train_overhead: step {step}: wall bare {self.bare:.2f}s instrumented "
                      f"{self.instr:.2f}s; cpu bare {self.bare_cpu:.2f}s instrumented "
                      f"{self.instr_cpu:.2f}s", file=sys.stderr, flush=True)
                self.instr = self.bare = self.instr_cpu = self.bare_cpu = 0.0

    chunk = int(os.environ.get("BENCH_CHUNK", 5))
    with stage_run("train", params) as tracker:
        ckpt = Checkpointer(tmp / "checkpoints", params["train"]["checkpoint_every"], "bench")
        ckpt.tracker = tracker
        hooks = [build_schedule(params["surge"], cfg.steps, params["seed"]), CurvesHook(),
                 MLflowHook(tracker, params["tracking"]["snapshot_every"], tmp / "reports"), ckpt]
        warm = Trainer(copy.deepcopy(model), train, val, cfg, [])
        warm.cfg = copy.copy(cfg)
        warm.cfg.steps = 10
        warm.fit()         # warm-up: allocator, thread pool, first-call costs
        bare.run(10)
        bare.step = 0
        timer = Interleave(chunk, steps)
        trainer = Trainer(model, train, val, cfg, [*hooks, timer])
        timer.start()
        trainer.fit()
        pairs, cpu_pairs = timer.pairs, timer.cpu_pairs
        events = len(trainer.events)
        sparsity = trainer.masks.sparsity()
    ratios = [i / b for b, i in pairs]
    ratio = statistics.median(ratios)
    ratio_cpu = statistics.median(i / b for b, i in cpu_pairs)
    print(json.dumps({
        "bench": "train_overhead",
        "config": {"params": "params.yaml defaults", "surge.mode": params["surge"]["mode"],
                   "d_model": params["model"]["d_model"], "batch_size": cfg.batch_size,
                   "seq_len": params["data"]["seq_len"], "threads": params["train"]["threads"]},
        "steps_per_block": steps, "repeats": repeats,
        "bare_ms_per_step": round(1000 * statistics.median(b for b, _ in pairs) / steps, 2),
        "instrumented_ms_per_step": round(1000 * statistics.median(i for _, i in pairs) / steps,
                                          2),
        "ratio": round(ratio, 4), "ratios": [round(x, 4) for x in ratios],
        "ratio_cpu": round(ratio_cpu, 4), "chunk": chunk,
        "target": 1.05, "met": ratio <= 1.05,
        "instrumented_events": events, "final_sparsity": round(sparsity, 4),
        "machine": machine(),
    }), flush=True)


if __name__ == "__main__":
    main()
