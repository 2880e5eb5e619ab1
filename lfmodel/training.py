"""The training loop: seeded, deterministic on CPU, with hooks for everything around it.

Hooks (any object with some of these methods) plug in without touching the loop:
    on_train_start(trainer)            after_backward(trainer, step)   dense grads, masks may change
    wants_monitor(step) -> bool        on_step_end(trainer, step, metrics)
    on_event(trainer, event)           on_train_end(trainer)
`metrics` is non-empty only on log / eval / event steps, so nothing syncs or formats per step.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfmodel.entropy import regularized_loss
from lfmodel.models import groups
from lfmodel.optim import Adam, clip_grad_norm_
from lfmodel.runtime import set_threads
from lfmodel.sparsity.masks import MaskSet


class DivergenceError(RuntimeError):
    """A non-finite loss: training stops; the last good checkpoint is kept."""

    def __init__(self, step: int, value: float, what: str = "loss") -> None:
        super().__init__(f"non-finite {what} ({value}) at step {step}; training stopped")
        self.step = step


@dataclass
class TrainConfig:
    """The training knobs, built only from params (from_params): config.DEFAULTS holds every
    default, so none is written here."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    cosine: bool
    warmup_steps: int
    grad_clip: float
    lambda_entropy: float
    lambda_balance: float
    eval_every: int
    log_every: int
    seed: int

    @classmethod
    def from_params(cls, params: dict) -> TrainConfig:
        t = params["train"]
        return cls(steps=t["steps"], batch_size=t["batch_size"], lr=t["lr"],
                   weight_decay=t["weight_decay"], cosine=t["cosine"],
                   warmup_steps=t["warmup_steps"], grad_clip=t["grad_clip"],
                   lambda_entropy=params["lambda_entropy"], lambda_balance=t["lambda_balance"],
                   eval_every=t["eval_every"], log_every=t["log_every"], seed=params["seed"])


def seed_everything(seed: int, threads: int) -> int:
    """One seed for python, numpy and torch; a thread count fixed for the whole run (float sums
    depend on it; 0 chooses it from the free cores, lfmodel.runtime). Returns the count used.

    Not `torch.use_deterministic_algorithms`: the CPU kernels used here are deterministic for a
    fixed thread count already, and that call imports torch's compiler (~5 s per stage).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return set_threads(threads)


def task_loss(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy (nats) for tokens, MSE for series."""
    if y.dtype == torch.long:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.mse_loss(out.squeeze(-1), y)


class Trainer:
    def __init__(self, model: nn.Module, train: dict[str, Any], val: dict[str, Any],
                 cfg: TrainConfig, hooks: list[Any] | None = None) -> None:
        """train / val: splits as tensors or numpy arrays (lfmodel.data builds numpy)."""
        self.model, self.cfg, self.hooks = model, cfg, list(hooks or [])
        # the model's device is the run's: data moves there once; the generators stay on the
        # CPU so the same seed draws the same batches on any device (lfmodel.runtime)
        self.device = next(model.parameters()).device

        def there(split: dict[str, Any], key: str) -> Tensor:
            return torch.as_tensor(split[key], device=self.device)

        self.train_x, self.train_y = there(train, "inputs"), there(train, "targets")
        self.val_x, self.val_y = there(val, "inputs"), there(val, "targets")
        # fused Adam: one kernel for all parameters, stepped directly (lfmodel.optim; on the
        # default model 1.74 ms torch's default, 0.41 fused, 0.19 here: bench/optim_step.py);
        # the same update as the default up to float rounding, as fused=True bit for bit
        self.params = list(model.parameters())
        self.optimizer = Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.masks = MaskSet(model, self.optimizer)
        self.groups = groups(model)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.lr_scale = 1.0      # the adaptive controller's "energy" multiplies the lr
        self.current_lr = self.lr_at(1)
        self.losses: list[float] = []   # every step's task loss: the stability measure
        self._pending: list[tuple[int, Tensor]] = []  # (step, [task, total]) not yet in losses
        self.lrs: list[float] = []      # every step's lr, energy boosts included
        self.events: list[dict] = []
        self.val_history: list[tuple[int, float]] = []

    # ---------------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        """The lr of `step`'s optimizer update: warmup, cosine, times lr_scale (the adaptive
        controller sets lr_scale for the step before the trainer reads this)."""
        c = self.cfg
        if c.warmup_steps and step <= c.warmup_steps:
            base = c.lr * step / c.warmup_steps
        elif c.cosine:
            t = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
            base = c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
        else:
            base = c.lr
        return base * self.lr_scale

    def emit(self, event: dict) -> None:
        self.events.append(event)
        for h in self.hooks:
            if hasattr(h, "on_event"):
                h.on_event(self, event)

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(self, *args)

    # ---------------------------------------------------------------- loop
    def fit(self) -> Trainer:
        from tqdm import tqdm

        cfg = self.cfg
        self._call("on_train_start")
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not sys.stderr.isatty(),
                   desc="train", dynamic_ncols=True)
        while self.step < cfg.steps:
            step = self.step + 1
            monitor = step % cfg.log_every == 0 or any(
                h.wants_monitor(step) for h in self.hooks if hasattr(h, "wants_monitor"))
            for g in self.groups.values():
                g.monitor = monitor
            self.model.train()
            idx = torch.randint(0, self.train_x.shape[0], (cfg.batch_size,),
                                generator=self.generator).to(self.device)
            out, gates = self.model(self.train_x[idx], return_gates=True)
            task = task_loss(out, self.train_y[idx])
            loss, parts = regularized_loss(task, gates, cfg.lambda_entropy, cfg.lambda_balance)
            self._pending.append((step, torch.stack([task.detach(), loss.detach()])))
            evaluate = step % cfg.eval_every == 0 or step == cfg.steps
            if monitor or evaluate:
                self.sync()   # a step that logs: check before the update, as every step did
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            n_events = len(self.events)
            self._call("after_backward", step)
            self.masks.mask_grads()
            if cfg.grad_clip:
                # torch's foreach clipping bit for bit, in a few multi-tensor ops instead of
                # three per parameter (0.34 ms per parameter, 0.29 foreach, 0.21 here)
                clip_grad_norm_(self.params, cfg.grad_clip)
            self.current_lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr
            self.optimizer.step()
            self.masks.apply()
            self.step = step
            self.lrs.append(self.current_lr)
            metrics: dict[str, float] = {}
            if monitor or len(self.events) > n_events:
                self.sync()
                metrics.update(self.snapshot(loss, task, parts, monitor))
            if evaluate:
                val = self.evaluate()
                # non-finite weights from this update: the next step's loss would stop
                # training, but after the last step nothing would, and save_model writes them
                if not math.isfinite(val):
                    raise DivergenceError(step, val, "validation loss")
                self.val_history.append((step, val))
                metrics["loss/val"] = val
                bar.set_postfix(loss=f"{self.losses[-1]:.3f}", val=f"{val:.3f}")
            self._call("on_step_end", step, metrics)
            bar.update(1)
        bar.close()
        self.sync()
        self._call("on_train_end")
        return self

    def sync(self) -> None:
        """Move the task losses of the steps since the last sync to `losses` (one host
        transfer) and stop at the first non-finite loss: the divergence guard. A step that does
        not log never waits for the device; a diverged run is caught at the next log step, or
        by state_dict (a checkpoint), whichever comes first, and the error names the first
        non-finite step. Checkpointer.save refuses non-finite weights on its own as well."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        values = torch.stack([v for _, v in self._pending]).tolist()
        self._pending.clear()
        for step, (task, total) in zip(steps, values, strict=True):
            if not (math.isfinite(task) and math.isfinite(total)):
                raise DivergenceError(step, task)
            self.losses.append(task)

    def snapshot(self, loss: Tensor, task: Tensor, parts: dict[str, Tensor],
                 monitored: bool) -> dict[str, float]:
        """Step metrics: losses, lr, per-layer (mask) sparsity, gate entropies, and activation
        entropies only if this step measured them (an event step that is not a monitor step
        still holds an earlier step's value)."""
        m = {"loss/train": task.item(), "loss/total": loss.item(), "lr": self.current_lr}
        for g, s in self.masks.group_sparsity().items():
            m[f"sparsity/{g}"] = s
        m["sparsity/all"] = self.masks.sparsity()
        for name, g in self.groups.items():
            if monitored and g.act_entropy is not None:
                m[f"entropy/act/{name}"] = float(g.act_entropy)
        for k, v in parts.items():
            m[f"gates/{k}"] = v.item()
        return m

    @torch.no_grad()
    def evaluate(self, x: Tensor | None = None, y: Tensor | None = None,
                 batch_size: int = 256, chunk: int = 64) -> float:
        """Mean task loss over a split (val by default), eval mode, no input noise.

        The loss is taken per `batch_size` sequences; the forward runs `chunk` sequences at a
        time and the logits are joined (rows are independent: the same logits, the same loss).
        A 256-sequence forward's activations (16 MB tensors) raised the train stage's peak RSS
        by ~100 MB (728 -> 627 MB on a 200-step train, bench/peak_rss.py's setup).
        """
        x = self.val_x if x is None else x
        y = self.val_y if y is None else y
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            out = torch.cat([self.model(xb[j:j + chunk]) for j in range(0, xb.shape[0], chunk)])
            total += float(task_loss(out, yb)) * yb.numel()
            count += yb.numel()
        self.model.train()
        return total / count

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        self.sync()
        return {
            "step": self.step, "lr_scale": self.lr_scale, "losses": list(self.losses),
            "lrs": list(self.lrs),
            "events": list(self.events), "val_history": list(self.val_history),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            **({"cuda_rng": torch.cuda.get_rng_state(self.device)}
               if self.device.type == "cuda" else {}),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "masks": self.masks.state_dict(), "masks_enabled": self.masks.enabled,
            "hooks": {type(h).__name__: h.state_dict() for h in self.hooks
                      if hasattr(h, "state_dict")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.masks.load_state_dict(state["masks"])
        self.masks.enabled = state["masks_enabled"]
        self.step, self.lr_scale = state["step"], state["lr_scale"]
        self.losses, self.events = list(state["losses"]), list(state["events"])
        self.lrs = list(state["lrs"])
        self.val_history = [tuple(v) for v in state["val_history"]]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        for h in self.hooks:
            if hasattr(h, "load_state_dict") and type(h).__name__ in state["hooks"]:
                h.load_state_dict(state["hooks"][type(h).__name__])
