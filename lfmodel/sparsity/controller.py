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
pump with nothing to move. Every decision is an event (trainer.emit) with step, layer, rule,
H (the EMA), H_step (this step's measurement), entries moved, sparsity_before/after (mask
sparsity of the layer, or of all prunable weights for `energy`) and lr (the learning rate
this step's update uses). `surge.scope` does not apply: the controller works per layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lfmodel.sparsity import Schedule

if TYPE_CHECKING:  # pragma: no cover
    from lfmodel.training import Trainer

RULES = ("collapse_high", "pump", "energy", "noise", "plateau_collapse", "floor")


class AdaptiveController(Schedule):
    mode = "adaptive"

    def __init__(self, surge: dict, total_steps: int, generator) -> None:
        super().__init__(surge, total_steps, generator)
        self.ema: dict[str, float] = {}           # per group: EMA of normalized act. entropy
        self.history: dict[str, list[float]] = {}  # per group: EMA at the last window+1 checks
        self.noise_until: dict[str, int] = {}     # per group: last step with input noise
        self.energy_start: int | None = None      # step of the last energy injection
        self.counts: dict[str, int] = dict.fromkeys(RULES, 0)

    # ---------------------------------------------------------------- trainer hooks
    def wants_monitor(self, step: int) -> bool:
        return step % self.p["check_every"] == 0

    def on_train_start(self, trainer: Trainer) -> None:
        """Re-arm input noise still due after a resume (the trainer restores lr_scale)."""
        for name, until in self.noise_until.items():
            if name in trainer.groups:
                trainer.groups[name].input_noise = (
                    self.p["input_noise"] if until > trainer.step else 0.0)

    def on_train_end(self, trainer: Trainer) -> None:
        for g in trainer.groups.values():
            g.input_noise = 0.0
        trainer.lr_scale = 1.0

    def after_backward(self, trainer: Trainer, step: int) -> None:
        self._expire_noise(trainer, step)
        if step % self.p["check_every"] == 0:
            self._check(trainer, step)
        trainer.lr_scale = self.energy_scale(step)

    # ---------------------------------------------------------------- pieces
    def energy_scale(self, step: int) -> float:
        """energy_boost at the injection step, linearly back to 1 after energy_steps steps."""
        if self.energy_start is None or step < self.energy_start:
            return 1.0
        n, boost = self.p["energy_steps"], self.p["energy_boost"]
        left = 1.0 - (step - self.energy_start) / n if n > 0 else float(step == self.energy_start)
        return 1.0 + (boost - 1.0) * max(0.0, left)

    def _expire_noise(self, trainer: Trainer, step: int) -> None:
        for name, until in self.noise_until.items():
            if until <= step and name in trainer.groups:
                trainer.groups[name].input_noise = 0.0

    def _observe(self, trainer: Trainer) -> dict[str, tuple[float, float]]:
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

    def _collapse(self, trainer: Trainer, event: dict, target: float | None = None) -> None:
        """Collapse event["layer"] to `target` (default: one step_sparsity more, up to
        max_sparsity) and emit `event` with the entries and sparsity moved; nothing to prune,
        no event."""
        masks, name = trainer.masks, event["layer"]
        names = list(masks.groups[name])
        before = masks.mask_sparsity(names)
        if target is None:
            target = min(before + self.p["step_sparsity"], self.p["max_sparsity"])
        target = round(target, 6)
        n = masks.collapse(target, "layer", group=name) if target > before + 1e-9 else 0
        if n:
            self._emit(trainer, event["step"], {**event, "entries": n, "sparsity_before": before,
                                                "sparsity_after": masks.mask_sparsity(names)})

    def _check(self, trainer: Trainer, step: int) -> None:
        p, masks = self.p, trainer.masks
        observed = self._observe(trainer)
        energized = [name for name, (h, _) in observed.items() if h > p["high"]]
        if energized and p["energy_boost"] != 1.0:
            self.energy_start = step  # first, so every event of this step reports its lr
        for name, (h, h_step) in observed.items():
            names = list(masks.groups[name])
            base = {"step": step, "layer": name, "H": h, "H_step": h_step}
            if h > p["high"]:
                self._collapse(trainer, {**base, "rule": "collapse_high"})
                before = masks.mask_sparsity(names)
                n = masks.rewire(p["pump_fraction"], group=name) if p["pump_fraction"] else 0
                if n:
                    self._emit(trainer, step, {**base, "rule": "pump", "entries": n,
                                               "sparsity_before": before,
                                               "sparsity_after": masks.mask_sparsity(names)})
                continue
            if h < p["low"] and p["noise_steps"] > 0 and p["input_noise"] > 0:
                self.noise_until[name] = step + p["noise_steps"]
                trainer.groups[name].input_noise = p["input_noise"]
                s = masks.mask_sparsity(names)
                self._emit(trainer, step, {**base, "rule": "noise", "entries": 0,
                                           "sparsity_before": s, "sparsity_after": s,
                                           "noise": p["input_noise"],
                                           "until": self.noise_until[name]})
            if self._plateau(name):
                self._collapse(trainer, {**base, "rule": "plateau_collapse"})
        floor = self.floor(step)
        for name in masks.groups if floor > 0 else ():
            self._collapse(trainer, {"step": step, "layer": name, "H": self.ema.get(name),
                                     "H_step": observed.get(name, (None, None))[1],
                                     "rule": "floor", "floor": floor}, target=floor)
        if energized and p["energy_boost"] != 1.0:
            s = masks.mask_sparsity(list(masks.params))
            self._emit(trainer, step, {
                "step": step, "layer": "all", "rule": "energy", "entries": 0,
                "H": max(self.ema[n] for n in energized), "H_step": None,
                "sparsity_before": s, "sparsity_after": s, "lr_scale": self.energy_scale(step),
                "triggered_by": ";".join(energized)})

    def _emit(self, trainer: Trainer, step: int, event: dict) -> None:
        """Add the learning rate this step's update uses (after any energy injection)."""
        trainer.lr_scale = self.energy_scale(step)
        event["lr"] = trainer.lr_at(step)
        self.counts[event["rule"]] = self.counts.get(event["rule"], 0) + 1
        trainer.emit(event)

    # ---------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "history": {k: list(v) for k, v in self.history.items()},
                "noise_until": dict(self.noise_until), "energy_start": self.energy_start,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = {k: float(v) for k, v in state["ema"].items()}
        self.history = {k: [float(x) for x in v] for k, v in state["history"].items()}
        self.noise_until = {k: int(v) for k, v in state["noise_until"].items()}
        start = state["energy_start"]
        self.energy_start = None if start is None else int(start)
        self.counts = {k: int(v) for k, v in state["counts"].items()}
