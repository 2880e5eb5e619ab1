"""Persistent masks, collapse / surge / rewire, and the fixed pruning schedules.

A masked entry is exactly 0 after every optimizer step, and so are its gradient and Adam
moments (the seed zeroed weights once and the next Adam step revived them all). The trainer
calls, per step: backward -> schedule.after_backward (sees dense gradients, may change masks)
-> masks.mask_grads() -> optimizer.step() -> masks.apply().
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lfmodel.models import prunable

if TYPE_CHECKING:  # pragma: no cover
    from lfmodel.training import Trainer


def _count(mask: Tensor) -> int:
    """True entries of a bool tensor (count_nonzero: ~10x faster than .sum() on bools)."""
    return int(torch.count_nonzero(mask))


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The exact k-th smallest value (1-based) of a 1-D tensor.

    Large inputs: a fixed-seed sample (global RNGs untouched) brackets the value in a narrow
    band [lo, hi]; if #(< lo) < k <= #(< lo) + #(in band), which the counts verify, the answer
    is the (k - #(< lo))-th value of the band, else kthvalue runs on everything. Same result as
    torch.kthvalue, a few times faster above ~2^20 elements."""
    n = flat.numel()
    if n <= 1 << 18:
        return torch.kthvalue(flat, k).values
    m = min(1 << 16, n >> 6)
    sample = flat[torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(n))]
    sample = sample.sort().values
    q = k / n
    margin = 8 * math.sqrt(q * (1 - q) / m) + 2 / m
    lo = sample[max(0, math.floor((q - margin) * m))]
    hi = sample[min(m - 1, math.ceil((q + margin) * m))]
    below = _count(flat < lo)
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return torch.kthvalue(band, k - below).values
    return torch.kthvalue(flat, k).values


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask of exactly k lowest entries (ties broken by index). Exact k-th value, no
    quantile: torch.quantile fails above 2^24 elements and is several times slower."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view_as(scores)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view_as(scores)
    thr = kth_smallest(flat, k)
    out = flat < thr
    need = k - _count(out)
    if need > 0:
        out[(flat == thr).nonzero().squeeze(1)[:need]] = True
    return out.view_as(scores)


class MaskSet:
    """One bool mask per prunable weight matrix, grouped by prunable group ("layer")."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.groups: dict[str, dict[str, nn.Parameter]] = prunable(model)
        self.params: dict[str, nn.Parameter] = {
            n: p for g in self.groups.values() for n, p in g.items()}
        self.masks: dict[str, Tensor] = {
            n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.optimizer = optimizer
        self.enabled = False  # nothing to do until the first collapse

    # -- the per-step invariant
    @torch.no_grad()
    def mask_grads(self) -> None:
        if not self.enabled:
            return
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    @torch.no_grad()
    def apply(self) -> None:
        if not self.enabled:
            return
        for n, p in self.params.items():
            p.mul_(self.masks[n])

    @torch.no_grad()
    def _zero_state(self, name: str, where: Tensor) -> None:
        """Zero weight and Adam moments of `name` at `where` (bool, same shape)."""
        p = self.params[name]
        p.masked_fill_(where, 0)
        if self.optimizer is not None:
            for v in self.optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.masked_fill_(where, 0)

    # -- measurement
    def sparsity(self, names: list[str] | None = None) -> float:
        """Zero fraction measured from the weights themselves."""
        names = list(self.params) if names is None else names
        zeros = sum(self.params[n].numel() - _count(self.params[n]) for n in names)
        total = sum(self.params[n].numel() for n in names)
        return zeros / max(total, 1)

    def group_sparsity(self) -> dict[str, float]:
        return {g: self.sparsity(list(t)) for g, t in self.groups.items()}

    def mask_sparsity(self, names: list[str]) -> float:
        return sum(self.masks[n].numel() - _count(self.masks[n]) for n in names) / max(
            sum(self.masks[n].numel() for n in names), 1)

    # -- operations
    @torch.no_grad()
    def collapse(self, sparsity: float, scope: str = "layer", group: str | None = None) -> int:
        """Prune the smallest-magnitude active entries until the zero fraction is `sparsity`
        (per tensor, or one global threshold over all tensors). Returns entries pruned."""
        self.enabled = True
        names = list(self.groups[group]) if group else list(self.params)
        before = self._pruned(names)
        if scope == "global" and group is None:
            scores = torch.cat([self._score(n).reshape(-1) for n in names])
            k = round(sparsity * scores.numel())
            if k > _count(scores < 0):
                pruned = lowest_k(scores, k)
                offset = 0
                for n in names:
                    m = pruned[offset:offset + self.params[n].numel()].view_as(self.params[n])
                    offset += self.params[n].numel()
                    self._set_pruned(n, m)
        else:
            for n in names:
                k = round(sparsity * self.params[n].numel())
                if k > self._pruned([n]):
                    self._set_pruned(n, lowest_k(self._score(n), k))
        return self._pruned(names) - before

    def _pruned(self, names: list[str]) -> int:
        return sum(self.masks[n].numel() - _count(self.masks[n]) for n in names)

    def _score(self, name: str) -> Tensor:
        """|w|, with already-pruned entries at -1 so they stay pruned and count toward k."""
        return torch.where(self.masks[name], self.params[name].detach().abs(), -1.0)

    def _set_pruned(self, name: str, pruned: Tensor) -> None:
        self.masks[name] = ~pruned
        self._zero_state(name, pruned)

    @torch.no_grad()
    def surge(self, fraction: float, how: str = "random", noise_scale: float = 0.5,
              generator: torch.Generator | None = None, group: str | None = None) -> int:
        """Revive round(fraction * pruned) entries per tensor: `random` (SET), `gradient`
        (largest dense |grad|, RigL; start at 0) or `all` (the seed). Revived weights start at
        N(0, (noise_scale * sigma)^2), sigma = std of the tensor's active weights."""
        revived = 0
        names = list(self.groups[group]) if group else list(self.params)
        for n in names:
            mask, p = self.masks[n], self.params[n]
            pruned_idx = (~mask).reshape(-1).nonzero().squeeze(1)
            k = pruned_idx.numel() if how == "all" else round(fraction * pruned_idx.numel())
            if k == 0:
                continue
            if how == "gradient":
                g = p.grad.reshape(-1)[pruned_idx].abs() if p.grad is not None else None
                chosen = pruned_idx[torch.topk(g, k).indices] if g is not None else pruned_idx[:k]
                values = torch.zeros(k)
            else:
                perm = torch.randperm(pruned_idx.numel(), generator=generator)[:k]
                chosen = pruned_idx if how == "all" else pruned_idx[perm]
                active = p[mask]
                sigma = float(active.std()) if active.numel() > 1 else 0.0
                values = torch.randn(k, generator=generator) * (noise_scale * sigma)
            mask.reshape(-1)[chosen] = True
            p.reshape(-1)[chosen] = values.to(p.dtype)
            revived += k
        return revived

    @torch.no_grad()
    def rewire(self, fraction: float, group: str | None = None) -> int:
        """Drop the weakest `fraction` of active weights, regrow as many pruned ones by dense
        |grad| (start at 0): information rerouted at constant sparsity (RigL / entropy pump)."""
        moved = 0
        names = list(self.groups[group]) if group else list(self.params)
        for n in names:
            mask, p = self.masks[n], self.params[n]
            n_active = int(mask.sum())
            k = min(round(fraction * n_active), int((~mask).sum()))
            if k == 0 or p.grad is None:
                continue
            drop = lowest_k(torch.where(mask, p.abs(), math.inf), k)
            grow_scores = torch.where(mask, -1.0, p.grad.abs())  # only currently pruned ones
            grow_idx = torch.topk(grow_scores.reshape(-1), k).indices
            mask.reshape(-1)[grow_idx] = True
            p.reshape(-1)[grow_idx] = 0.0
            mask[drop] = False
            self._zero_state(n, drop)
            moved += k
        return moved

    def state_dict(self) -> dict[str, Tensor]:
        return {n: m.clone() for n, m in self.masks.items()}

    def save(self, path: str | Path) -> None:
        """Write the masks as uint8 safetensors (1 = kept), one tensor per prunable weight
        name: the format of data/model/masks.safetensors and of the sparsity snapshots."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: m.to(dtype=torch.uint8).contiguous() for n, m in self.masks.items()},
                  str(path))

    def load_state_dict(self, masks: dict[str, Tensor]) -> None:
        for n in self.masks:
            self.masks[n] = masks[n].to(torch.bool).clone()
        self.enabled = any(not bool(m.all()) for m in self.masks.values())


# ---------------------------------------------------------------- schedules
class Schedule:
    """A trainer hook that changes masks in `after_backward` and reports events.

    Subclasses implement `events(trainer, step)`; each returned event is a dict with at least
    `rule`; the base class adds step, layer, sparsity before/after and lr, and emits it.
    """

    mode = "dense"

    def __init__(self, surge: dict, total_steps: int, generator: torch.Generator) -> None:
        self.p = surge
        self.total = total_steps
        self.generator = generator

    def after_backward(self, trainer: Trainer, step: int) -> None:
        masks = trainer.masks
        for rule, fn, layer in self.actions(step):
            before = masks.sparsity() if layer is None else masks.sparsity(list(masks.groups[layer]))
            n = fn(masks)
            names = list(masks.params) if layer is None else list(masks.groups[layer])
            trainer.emit({"step": step, "layer": layer or "all", "rule": rule, "entries": n,
                          "sparsity_before": before, "sparsity_after": masks.mask_sparsity(names),
                          "lr": trainer.current_lr})

    def actions(self, step: int) -> list:
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

    def actions(self, step: int) -> list:
        at = max(1, round(self.p["start_fraction"] * self.total))
        if step != at:
            return []
        s, scope = self.p["target_sparsity"], self.p["scope"]
        return [("collapse", lambda m: m.collapse(s, scope), None)]


class Interval(Schedule):
    """The seed's schedule: collapse to target every `collapse_every` steps, surge (revive
    `recovery` of the pruned entries) every `surge_every`. Never at step 0 (the seed pruned the
    random init). When both fire on one step, collapse runs first, then surge: the other order
    would prune the freshly revived (small) weights at once, making surge a no-op."""

    mode = "interval"

    def actions(self, step: int) -> list:
        p, out = self.p, []
        if step <= 0:
            return out
        if step % p["collapse_every"] == 0:
            out.append(("collapse", lambda m: m.collapse(p["target_sparsity"], p["scope"]), None))
        if step % p["surge_every"] == 0 and step < self.total:
            out.append(("surge", lambda m: m.surge(p["recovery"], p["regrow"], p["noise_scale"],
                                                   self.generator), None))
        return out


class RigL(Schedule):
    """Collapse once at start_fraction, then every `rigl_every` steps drop-and-grow at constant
    sparsity with drop fraction drop_fraction * (1 + cos(pi t / T_end)) / 2, stopping at
    rigl_end_fraction of training (Evci et al. 2020)."""

    mode = "rigl"

    def actions(self, step: int) -> list:
        p = self.p
        start = max(1, round(p["start_fraction"] * self.total))
        end = round(p["rigl_end_fraction"] * self.total)
        if step == start:
            return [("collapse", lambda m: m.collapse(p["target_sparsity"], p["scope"]), None)]
        if start < step < end and (step - start) % p["rigl_every"] == 0:
            frac = p["drop_fraction"] * (1 + math.cos(math.pi * (step - start) / (end - start))) / 2
            return [("rewire", lambda m: m.rewire(frac), None)]
        return []


SCHEDULES: dict[str, type[Schedule]] = {
    "dense": Dense, "static": Static, "interval": Interval, "rigl": RigL}


def build_schedule(surge: dict, total_steps: int, seed: int) -> Schedule:
    """`surge` section of params.yaml -> schedule hook (adaptive lives in lfmodel.controller)."""
    generator = torch.Generator().manual_seed(seed + 1)
    if surge["mode"] == "adaptive":
        from lfmodel.controller import AdaptiveController
        return AdaptiveController(surge, total_steps, generator)
    return SCHEDULES[surge["mode"]](surge, total_steps, generator)
