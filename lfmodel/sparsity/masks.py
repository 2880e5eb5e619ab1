"""Persistent masks: the exact k-th value, the k lowest entries, and MaskSet.

A masked entry is exactly 0 after every optimizer step, and so are its gradient and Adam
moments (the seed zeroed weights once and the next Adam step revived them all). The trainer
calls, per step: backward -> schedule.after_backward (sees dense gradients, may change masks)
-> masks.mask_grads() -> optimizer.step() -> masks.apply().
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lfmodel.models import Slot, prunable, weight

FAST_PATH_MIN = 1 << 18  # kth_smallest samples a band above this many elements
# Devices where the k-th value comes from a sort: kthvalue's CUDA kernel raises under
# torch.use_deterministic_algorithms (which index it returns among ties is not deterministic),
# and runtime.select_device switches that on for every cuda run. The value is the same.
SORT_DEVICES = {"cuda"}


def _count(mask: Tensor) -> int:
    """True entries of a bool tensor (count_nonzero: ~10x faster than .sum() on bools)."""
    return int(torch.count_nonzero(mask))


def kthvalue(values: Tensor, k: int) -> Tensor:
    """torch.kthvalue(values, k).values (1-D, k 1-based), also on a device in SORT_DEVICES."""
    if values.device.type in SORT_DEVICES:
        return values.sort().values[k - 1]
    return torch.kthvalue(values, k).values


def sample_positions(n: int) -> Tensor:
    """The positions kth_smallest samples from n elements: fixed seed, global RNGs untouched."""
    m = min(1 << 16, n >> 6)
    return torch.randint(0, n, (m,), generator=torch.Generator().manual_seed(n))


def kth_in_band(flat: Tensor, k: int) -> Tensor | None:
    """The k-th smallest value (1-based) found inside a narrow band, or None if the band misses.

    A sample brackets the value in [lo, hi]; if #(< lo) < k <= #(< lo) + #(in band), which the
    counts verify, the answer is the (k - #(< lo))-th value of the band."""
    n = flat.numel()
    sample = flat[sample_positions(n).to(flat.device)].sort().values
    m = sample.numel()
    q = k / n
    margin = 8 * math.sqrt(q * (1 - q) / m) + 2 / m
    lo = sample[max(0, math.floor((q - margin) * m))]
    hi = sample[min(m - 1, math.ceil((q + margin) * m))]
    below = _count(flat < lo)
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return kthvalue(band, k - below)
    return None


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The exact k-th smallest value (1-based) of a 1-D tensor: torch.kthvalue's result, a few
    times faster above ~2^20 elements (kth_in_band, falling back to kthvalue on everything)."""
    if flat.numel() > FAST_PATH_MIN:
        value = kth_in_band(flat, k)
        if value is not None:
            return value
    return kthvalue(flat, k)


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Bool mask of exactly k lowest entries (ties broken by index). Exact k-th value, no
    quantile: torch.quantile fails above 2^24 elements and is several times slower."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    thr = kth_smallest(flat, k)
    out = flat < thr
    need = k - _count(out)
    if need > 0:
        out[(flat == thr).nonzero().squeeze(1)[:need]] = True
    return out.view(scores.shape)


def _put(t: Tensor, flat_idx: Tensor, values: Tensor | float | bool) -> None:
    """t.flatten()[flat_idx] = values, in place for any strides: reshape(-1) of a
    non-contiguous tensor is a copy, and a write through it is lost."""
    t[torch.unravel_index(flat_idx, t.shape)] = values


class MaskSet:
    """One bool mask per prunable weight matrix, grouped by prunable group ("layer").

    `params[name]` is the weight matrix: a parameter, or for an expert a slice of its MoE
    layer's stacked parameter (models.prunable). A stacked parameter has one mask whose slices
    are its experts' masks (`masks[name]`, views: changed in place only), so the per-step ops
    run once per parameter."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        slots = prunable(model)
        self.groups: dict[str, list[str]] = {g: list(s) for g, s in slots.items()}
        self.slots: dict[str, Slot] = {n: s for g in slots.values() for n, s in g.items()}
        self.params: dict[str, Tensor] = {n: p if i is None else weight((p, i))
                                          for n, (p, i) in self.slots.items()}
        full: dict[int, tuple[nn.Parameter, Tensor]] = {}
        for p, _ in self.slots.values():
            full.setdefault(id(p), (p, torch.ones(p.shape, dtype=torch.bool, device=p.device)))
        self._full = list(full.values())
        self.masks: dict[str, Tensor] = {
            n: full[id(p)][1] if i is None else full[id(p)][1][i]
            for n, (p, i) in self.slots.items()}
        self.optimizer = optimizer
        self.enabled = False  # nothing to do until the first collapse

    # -- the per-step invariant
    @torch.no_grad()
    def mask_grads(self) -> None:
        """grad *= mask for every prunable parameter, in one fused multi-tensor op."""
        if not self.enabled:
            return
        named = [(p.grad, m) for p, m in self._full if p.grad is not None]
        if named:
            grads, masks = zip(*named, strict=True)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def apply(self) -> None:
        """weight *= mask for every prunable parameter, in one fused multi-tensor op."""
        if self.enabled:
            torch._foreach_mul_([p for p, _ in self._full], [m for _, m in self._full])

    def grad(self, name: str) -> Tensor | None:
        """The gradient of one weight matrix (a view of its parameter's), None before backward."""
        p, i = self.slots[name]
        return p.grad if p.grad is None or i is None else p.grad[i]

    def state(self, name: str) -> list[Tensor]:
        """The optimizer's per-entry state of one weight matrix (Adam's moments), as views."""
        p, i = self.slots[name]
        st = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        return [v if i is None else v[i] for v in st.values()
                if isinstance(v, Tensor) and v.shape == p.shape]

    @torch.no_grad()
    def _zero_state(self, name: str, where: Tensor) -> None:
        """Zero weight and Adam moments of `name` at `where` (bool, same shape)."""
        self.params[name].masked_fill_(where, 0)
        for v in self.state(name):
            v.masked_fill_(where, 0)

    # -- measurement
    def names(self, group: str | None = None) -> list[str]:
        """Parameter names of one group, or of all prunable weights."""
        return list(self.groups[group]) if group is not None else list(self.params)

    def pruned(self, names: list[str]) -> int:
        """Entries pruned by the masks among `names`."""
        return sum(self.masks[n].numel() - _count(self.masks[n]) for n in names)

    def sparsity(self, group: str | None = None) -> float:
        """The pruned fraction of one group's prunable weights (all of them if None).

        Measured from the masks, not the weights, deliberately: it is what the schedules set and
        what every event's sparsity_before/after reports, and it does not move when a weight
        regrown at 0 (gradient surge, rewire) is still 0 or a live weight happens to be 0.
        (evaluation's `sparsity` counts zeros in model.safetensors: a property of the file.)"""
        names = self.names(group)
        return self.pruned(names) / max(sum(self.masks[n].numel() for n in names), 1)

    def group_sparsity(self) -> dict[str, float]:
        return {g: self.sparsity(g) for g in self.groups}

    # -- operations
    @torch.no_grad()
    def collapse(self, sparsity: float, scope: str, group: str | None = None) -> int:
        """Prune the smallest-magnitude active entries until the pruned fraction is `sparsity`
        (per tensor, or one global threshold over all tensors). Returns entries pruned."""
        self.enabled = True
        names = self.names(group)
        before = self.pruned(names)
        if scope == "global" and group is None:
            scores = torch.cat([self._score(n).reshape(-1) for n in names])
            k = round(sparsity * scores.numel())
            if k > _count(scores < 0):
                pruned = lowest_k(scores, k)
                offset = 0
                for n in names:
                    size = self.params[n].numel()
                    self._set_pruned(n, pruned[offset:offset + size].view(self.params[n].shape))
                    offset += size
        else:
            for n in names:
                k = round(sparsity * self.params[n].numel())
                if k > self.pruned([n]):
                    self._set_pruned(n, lowest_k(self._score(n), k))
        return self.pruned(names) - before

    def _score(self, name: str) -> Tensor:
        """|w|, with already-pruned entries at -1 so they stay pruned and count toward k."""
        return torch.where(self.masks[name], self.params[name].detach().abs(), -1.0)

    def _set_pruned(self, name: str, pruned: Tensor) -> None:
        self.masks[name].copy_(~pruned)
        self._zero_state(name, pruned)

    def _grad(self, name: str) -> Tensor:
        g = self.grad(name)
        if g is None:
            raise ValueError(f"regrow by gradient needs a dense gradient, but {name} has none "
                             "(call it after backward, before the optimizer step)")
        return g

    @torch.no_grad()
    def surge(self, fraction: float, how: str, noise_scale: float,
              generator: torch.Generator | None = None, group: str | None = None) -> int:
        """Revive round(fraction * pruned) entries per tensor: `random` (SET), `gradient`
        (largest dense |grad|, RigL; start at 0) or `all` (the seed). Revived weights start at
        N(0, (noise_scale * sigma)^2), sigma = std of the tensor's active weights."""
        revived = 0
        for n in self.names(group):
            mask, p = self.masks[n], self.params[n]
            pruned_idx = (~mask).reshape(-1).nonzero().squeeze(1)
            k = pruned_idx.numel() if how == "all" else round(fraction * pruned_idx.numel())
            if k == 0:
                continue
            if how == "gradient":
                g = self._grad(n).reshape(-1)[pruned_idx].abs()
                chosen = pruned_idx[torch.topk(g, k).indices]
                values = torch.zeros(k, device=p.device)
            else:
                perm = torch.randperm(pruned_idx.numel(), generator=generator)[:k]
                chosen = pruned_idx if how == "all" else pruned_idx[perm.to(p.device)]
                active = p[mask]
                sigma = float(active.std()) if active.numel() > 1 else 0.0
                values = torch.randn(k, generator=generator).to(p.device) * (noise_scale * sigma)
            _put(mask, chosen, True)
            _put(p, chosen, values.to(p.dtype))
            revived += k
        return revived

    @torch.no_grad()
    def rewire(self, fraction: float, group: str | None = None) -> int:
        """Drop the weakest `fraction` of active weights, regrow as many pruned ones by dense
        |grad| (start at 0): information rerouted at constant sparsity (RigL / entropy pump)."""
        moved = 0
        for n in self.names(group):
            mask, p = self.masks[n], self.params[n]
            k = min(round(fraction * _count(mask)), mask.numel() - _count(mask))
            if k == 0:
                continue
            drop = lowest_k(torch.where(mask, p.abs(), math.inf), k)
            grow_scores = torch.where(mask, -1.0, self._grad(n).abs())  # only pruned ones
            grow_idx = torch.topk(grow_scores.reshape(-1), k).indices
            _put(mask, grow_idx, True)
            _put(p, grow_idx, 0.0)
            mask[drop] = False
            self._zero_state(n, drop)
            moved += k
        return moved

    # -- persistence
    def state_dict(self) -> dict[str, Tensor]:
        return {n: m.clone() for n, m in self.masks.items()}

    def load_state_dict(self, masks: dict[str, Tensor]) -> None:
        for n, m in self.masks.items():
            m.copy_(masks[n].to(m.device, torch.bool))
        self.enabled = any(not bool(m.all()) for m in self.masks.values())

    def save(self, path: str | Path) -> None:
        """Write the masks as uint8 safetensors (1 = kept), one tensor per prunable weight
        name: the format of data/model/masks.safetensors and of the sparsity snapshots."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({n: m.to(dtype=torch.uint8).contiguous() for n, m in self.masks.items()},
                  str(path))
