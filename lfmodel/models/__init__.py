"""Model construction from params, and the prunable groups of a model."""

from __future__ import annotations

from torch import Tensor, nn

from lfmodel.models.common import AdaptiveLinear, Monitored
from lfmodel.models.lfm import Expert, LFModel
from lfmodel.models.mlp import AutoRegressiveModel

__all__ = ["AdaptiveLinear", "AutoRegressiveModel", "LFModel", "Monitored", "Slot", "build_model",
           "groups", "prunable", "weight"]


def build_model(model_params: dict, vocab_size: int | None) -> nn.Module:
    """`model` section of params.yaml -> module; vocab_size None means a series (regression)."""
    p = model_params
    if p["arch"] == "mlp":
        return AutoRegressiveModel(vocab_size, context=p["context"], hidden=p["hidden"])
    return LFModel(vocab_size, d_model=p["d_model"], num_layers=p["num_layers"],
                   num_experts=p["num_experts"], expert_dim=p["expert_dim"],
                   adapt_dim=p["adapt_dim"], adapt_rank=p["adapt_rank"])


def groups(model: nn.Module) -> dict[str, Monitored]:
    """Prunable groups by dotted name, e.g. 'blocks.0.moe.experts.1' -> 'block0.moe.expert1'."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Monitored):
            out[short_name(name)] = mod
    return out


def short_name(name: str) -> str:
    return name.replace("blocks.", "block").replace("experts.", "expert")


Slot = tuple[nn.Parameter, int | None]  # a weight matrix: the parameter, or its slice [index]


def prunable(model: nn.Module) -> dict[str, dict[str, Slot]]:
    """{group: {name: (parameter, index)}}: the 2-D weight matrices of each prunable group. An
    expert's are slices of its MoE layer's stacked parameters (index = the expert), named as
    the per-expert module paths they replace; every other one is a whole parameter (None)."""
    modules = dict(model.named_modules())
    out: dict[str, dict[str, Slot]] = {}
    for gname, mod in groups(model).items():
        prefix = next(n for n, m in modules.items() if m is mod)
        if isinstance(mod, Expert):
            moe = prefix.rsplit(".experts.", 1)[0]
            out[gname] = modules[moe].expert_weights(moe, mod.index)
        else:
            out[gname] = {f"{prefix}.{n}": (p, None) for n, p in mod.named_parameters()
                          if p.dim() == 2}
    return out


def weight(slot: Slot) -> Tensor:
    """The weight matrix of a slot, as a tensor that shares the parameter's storage (no
    autograd): in-place changes to it are changes to the parameter."""
    p, index = slot
    return p.detach() if index is None else p.detach()[index]
