"""Schedules: trainer hooks that change the masks in `after_backward` and report events.

Dense, static, gradual, interval and rigl here (the adaptive controller in controller.py). Every
schedule and the controller build their events with `record`, the one event builder: the
sparsity before/after comes from the masks, the lr is the one the optimizer uses at that step.
The hooks see the trainer only through `TrainerLike`; nothing here imports training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from lfmodel.sparsity.masks import MaskSet


class GroupLike(Protocol):
    """What a hook reads and sets on a prunable group (models.Monitored)."""

    act_entropy: Tensor | None
    input_noise: float


class TrainerLike(Protocol):
    """What schedules and the controller use from the trainer."""

    masks: MaskSet
    groups: Mapping[str, GroupLike]
    step: int
    lr_scale: float

    def lr_at(self, step: int) -> float: ...

    def emit(self, event: dict[str, Any]) -> None: ...


def record(trainer: TrainerLike, step: int, layer: str | None, rule: str,
           act: Callable[[MaskSet], int], *, always: bool = False, **extra: Any) -> int:
    """Run `act` on the masks and emit its event; returns the entries it moved.

    The event: step, layer ("all" for every prunable weight), rule, entries, the layer's mask
    sparsity before and after, lr (trainer.lr_at(step): the lr of this step's optimizer update,
    so a hook that changes trainer.lr_scale must do so before it records), then `extra`.
    An act that moves nothing emits nothing unless `always`."""
    before = trainer.masks.sparsity(layer)
    entries = act(trainer.masks)
    if entries or always:
        trainer.emit({"step": step, "layer": layer or "all", "rule": rule, "entries": entries,
                      "sparsity_before": before, "sparsity_after": trainer.masks.sparsity(layer),
                      "lr": trainer.lr_at(step), **extra})
    return entries


Action = tuple[str, Callable[[MaskSet], int]]


class Schedule:
    """A fixed schedule: `actions(step)` lists (rule, act) pairs run on all prunable weights;
    each runs through `record`, so it is an event (also when it moves nothing)."""

    mode = "dense"

    def __init__(self, surge: dict, total_steps: int, generator: torch.Generator) -> None:
        self.p = surge
        self.total = total_steps
        self.generator = generator

    def after_backward(self, trainer: TrainerLike, step: int) -> None:
        for rule, act in self.actions(step):
            record(trainer, step, None, rule, act, always=True)

    def actions(self, step: int) -> list[Action]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Dense(Schedule):
    mode = "dense"


class Static(Schedule):
    """One collapse at start_fraction of training; the masks are then fixed."""

    mode = "static"

    def actions(self, step: int) -> list[Action]:
        at = max(1, round(self.p["start_fraction"] * self.total))
        if step != at:
            return []
        s, scope = self.p["target_sparsity"], self.p["scope"]
        return [("collapse", lambda m: m.collapse(s, scope))]


class Interval(Schedule):
    """The seed's schedule: collapse to target every `collapse_every` steps, surge (revive
    `recovery` of the pruned entries) every `surge_every`. Never at step 0 (the seed pruned the
    random init). When both fire on one step, collapse runs first, then surge: the other order
    would prune the freshly revived (small) weights at once, making surge a no-op. No surge on
    the last step: it would save revived weights that were never trained (with regrow `all`, a
    dense model), so a run ends after its last collapse and the updates since."""

    mode = "interval"

    def actions(self, step: int) -> list[Action]:
        p, out = self.p, []
        if step <= 0:
            return out
        if step % p["collapse_every"] == 0:
            out.append(("collapse", lambda m: m.collapse(p["target_sparsity"], p["scope"])))
        if step % p["surge_every"] == 0 and step < self.total:
            out.append(("surge", lambda m: m.surge(p["recovery"], p["regrow"], p["noise_scale"],
                                                   self.generator)))
        return out


class RigL(Schedule):
    """Collapse once at start_fraction, then every `rigl_every` steps drop-and-grow at constant
    sparsity with drop fraction drop_fraction * (1 + cos(pi t / T_end)) / 2, stopping at
    rigl_end_fraction of training (Evci et al. 2020)."""

    mode = "rigl"

    def actions(self, step: int) -> list[Action]:
        p = self.p
        start = max(1, round(p["start_fraction"] * self.total))
        end = round(p["rigl_end_fraction"] * self.total)
        if step == start:
            return [("collapse", lambda m: m.collapse(p["target_sparsity"], p["scope"]))]
        if start < step < end and (step - start) % p["rigl_every"] == 0:
            frac = p["drop_fraction"] * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2
            return [("rewire", lambda m: m.rewire(frac))]
        return []


class Gradual(Schedule):
    """Gradual magnitude pruning (Zhu & Gupta 2017): between t0 = gradual_start_fraction and
    t1 = gradual_end_fraction of the steps, every `gradual_every` steps after t0 and at t1,
    collapse to s_t = target * (1 - (1 - (t - t0) / (t1 - t0))^3); masks then fixed. The cube
    prunes fast while many redundant weights remain and slowly near the target; t1 is always a
    pruning step, so training after it runs at exactly target_sparsity. No event at t0 (s = 0)."""

    mode = "gradual"

    def window(self) -> tuple[int, int]:
        """(t0, t1) in steps; t1 >= 1 (steps count from 1) and t0 <= t1 for tiny runs."""
        t1 = max(1, round(self.p["gradual_end_fraction"] * self.total))
        return min(round(self.p["gradual_start_fraction"] * self.total), t1), t1

    def sparsity_at(self, step: int) -> float:
        t0, t1 = self.window()
        frac = 1.0 if t1 == t0 else min(1.0, max(0.0, (step - t0) / (t1 - t0)))
        return self.p["target_sparsity"] * (1 - (1 - frac) ** 3)

    def actions(self, step: int) -> list[Action]:
        t0, t1 = self.window()
        if not (t0 < step <= t1 and (step == t1 or (step - t0) % self.p["gradual_every"] == 0)):
            return []
        s, scope = self.sparsity_at(step), self.p["scope"]
        return [("collapse", lambda m: m.collapse(s, scope))]


SCHEDULES: dict[str, type[Schedule]] = {
    "dense": Dense, "static": Static, "gradual": Gradual, "interval": Interval, "rigl": RigL}
