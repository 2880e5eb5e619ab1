"""The adaptive surge-collapse controller (`surge.mode: adaptive`, DESIGN.md "Adaptive controller").

Every `check_every` steps the trainer measures each prunable group's normalized activation
entropy (this hook's `wants_monitor`); the controller keeps its exponential moving average
    H <- ema * H + (1 - ema) * H_step          (the first measurement initializes H)
and decides per group, in this order:

  collapse_high  H > high: collapse the group by `step_sparsity` (mask sparsity
                 s -> min(s + step_sparsity, max_sparsity)), then
  pump           the entropy pump: MaskSet.rewire(pump_fraction, group): drop the weakest
                 pump_fraction of the active weights, regrow as many pruned ones by dense
                 |grad| (at 0), sparsity unchanged; and
  energy         inject energy: trainer.lr_scale = energy_boost, decaying linearly back to 1
                 over `energy_steps` steps (lr is global: one event per check, naming the
                 layers that triggered it).
  noise          H < low: the group's inputs get N(0, input_noise^2) noise in training for
                 the next `noise_steps` steps (Monitored.input_noise; never in eval mode).
  plateau_collapse  not high, and |H - H from `plateau_window` checks ago| < plateau_eps:
                 collapse the group by `step_sparsity` (up to max_sparsity). May fire on the
                 same check as `noise` (a flat, low-entropy layer gets both).
  floor          last, the sparsity budget: a layer below
                 target_sparsity * min(1, step / (floor_end_fraction * steps)) is collapsed to
                 it. The rules above decide where and when sparsity comes early; the floor makes
                 adaptive end at the same target_sparsity as static/interval/rigl, so the study
                 compares modes at equal sparsity (issue 5). floor_end_fraction 0 turns it off
                 (the controller exactly as DESIGN.md words it).

A collapse with no room left (already at max_sparsity) is skipped and emits nothing; so is a
pump with nothing to move. Every decision is an event built by schedules.record (step, layer,
rule, entries, mask sparsity before/after of the layer, or of all prunable weights for
`energy`, and the lr of this step's update, the energy boost included) plus H (the EMA) and
H_step (this step's measurement). `surge.scope` does not apply: the controller works per layer.
"""

from __future__ import annotations

import torch

from lfmodel.sparsity.schedules import Schedule, TrainerLike, record

RULES = ("collapse_high", "pump", "energy", "noise", "plateau_collapse", "floor")


class AdaptiveController(Schedule):
    mode = "adaptive"

    def __init__(self, surge: dict, total_steps: int, generator: torch.Generator) -> None:
        super().__init__(surge, total_steps, generator)
        self.ema: dict[str, float] = {}           # per group: EMA of normalized act. entropy
        self.history: dict[str, list[float]] = {}  # per group: EMA at the last window+1 checks
        self.noise_until: dict[str, int] = {}     # per group: last step with input noise
        self.energy_start: int | None = None      # step of the last energy injection

    # ---------------------------------------------------------------- trainer hooks
    def wants_monitor(self, step: int) -> bool:
        return step % self.p["check_every"] == 0

    def on_train_start(self, trainer: TrainerLike) -> None:
        """Re-arm input noise still due after a resume (the trainer restores lr_scale)."""
        for name, until in self.noise_until.items():
            if name in trainer.groups:
                trainer.groups[name].input_noise = (
                    self.p["input_noise"] if until > trainer.step else 0.0)

    def on_train_end(self, trainer: TrainerLike) -> None:
        for g in trainer.groups.values():
            g.input_noise = 0.0
        trainer.lr_scale = 1.0

    def after_backward(self, trainer: TrainerLike, step: int) -> None:
        p = self.p
        self._expire_noise(trainer, step)
        check = step % p["check_every"] == 0
        observed = self._observe(trainer) if check else {}
        energized = [name for name, (h, _) in observed.items() if h > p["high"]]
        if energized and p["energy_boost"] != 1.0:
            self.energy_start = step
        trainer.lr_scale = self.energy_scale(step)  # first: every event reports this step's lr
        if check:
            self._decide(trainer, step, observed, energized)

    # ---------------------------------------------------------------- pieces
    def energy_scale(self, step: int) -> float:
        """energy_boost at the injection step, linearly back to 1 after energy_steps steps."""
        if self.energy_start is None or step < self.energy_start:
            return 1.0
        n, boost = self.p["energy_steps"], self.p["energy_boost"]
        left = 1.0 - (step - self.energy_start) / n if n > 0 else float(step == self.energy_start)
        return 1.0 + (boost - 1.0) * max(0.0, left)

    def _expire_noise(self, trainer: TrainerLike, step: int) -> None:
        for name, until in self.noise_until.items():
            if until <= step and name in trainer.groups:
                trainer.groups[name].input_noise = 0.0

    def _observe(self, trainer: TrainerLike) -> dict[str, tuple[float, float]]:
        """Update EMA and history; {group: (EMA, this step's value)} for measured groups."""
        a, window = self.p["ema"], self.p["plateau_window"]
        out = {}
        for name in trainer.masks.groups:
            g = trainer.groups.get(name)
            if g is None or g.act_entropy is None:
                continue
            h_step = float(g.act_entropy)
            h = h_step if name not in self.ema else a * self.ema[name] + (1 - a) * h_step
            self.ema[name] = h
            hist = self.history.setdefault(name, [])
            hist.append(h)
            del hist[:-(window + 1)]
            out[name] = (h, h_step)
        return out

    def _plateau(self, name: str) -> bool:
        hist, window = self.history[name], self.p["plateau_window"]
        return len(hist) > window and abs(hist[-1] - hist[-1 - window]) < self.p["plateau_eps"]

    def floor(self, step: int) -> float:
        """The sparsity every layer must have reached by `step` (0 when the floor is off)."""
        end = self.p["floor_end_fraction"] * self.total
        if end <= 0:
            return 0.0
        return self.p["target_sparsity"] * min(1.0, step / end)

    def _collapse(self, trainer: TrainerLike, step: int, name: str, rule: str,
                  target: float | None, **extra: object) -> None:
        """Collapse layer `name` to `target` (None: one step_sparsity more, up to max_sparsity);
        nothing to prune, no event."""
        before = trainer.masks.sparsity(name)
        if target is None:
            target = min(before + self.p["step_sparsity"], self.p["max_sparsity"])
        target = round(target, 6)
        if target > before + 1e-9:
            record(trainer, step, name, rule,
                   lambda m: m.collapse(target, "layer", group=name), **extra)

    def _decide(self, trainer: TrainerLike, step: int, observed: dict[str, tuple[float, float]],
                energized: list[str]) -> None:
        p = self.p
        for name, (h, h_step) in observed.items():
            H = {"H": h, "H_step": h_step}
            if h > p["high"]:
                self._collapse(trainer, step, name, "collapse_high", None, **H)
                if p["pump_fraction"]:
                    record(trainer, step, name, "pump",
                           lambda m, name=name: m.rewire(p["pump_fraction"], group=name), **H)
                continue
            if h < p["low"] and p["noise_steps"] > 0 and p["input_noise"] > 0:
                self.noise_until[name] = step + p["noise_steps"]
                trainer.groups[name].input_noise = p["input_noise"]
                record(trainer, step, name, "noise", lambda m: 0, always=True, **H,
                       noise=p["input_noise"], until=self.noise_until[name])
            if self._plateau(name):
                self._collapse(trainer, step, name, "plateau_collapse", None, **H)
        floor = self.floor(step)
        for name in trainer.masks.groups if floor > 0 else ():
            self._collapse(trainer, step, name, "floor", floor, H=self.ema.get(name),
                           H_step=observed.get(name, (None, None))[1], floor=floor)
        if energized and p["energy_boost"] != 1.0:
            record(trainer, step, None, "energy", lambda m: 0, always=True,
                   H=max(self.ema[n] for n in energized), H_step=None,
                   lr_scale=self.energy_scale(step), triggered_by=";".join(energized))

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "history": {k: list(v) for k, v in self.history.items()},
                "noise_until": dict(self.noise_until), "energy_start": self.energy_start}

    def load_state_dict(self, state: dict) -> None:
        self.ema = {k: float(v) for k, v in state["ema"].items()}
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.noise_until = {k: int(v) for k, v in state["noise_until"].items()}
        start = state["energy_start"]
        self.energy_start = None if start is None else int(start)
