"""Model construction from params, and the prunable groups of a model."""

from __future__ import annotations

from torch import nn

from lfmodel.models.common import AdaptiveLinear, Monitored
from lfmodel.models.lfm import LFModel
from lfmodel.models.mlp import AutoRegressiveModel

__all__ = ["AdaptiveLinear", "AutoRegressiveModel", "LFModel", "Monitored", "build_model",
           "groups", "prunable"]


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


def prunable(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """{group: {full parameter name: weight matrix}}: 2-D weights inside prunable groups."""
    out: dict[str, dict[str, nn.Parameter]] = {}
    for gname, mod in groups(model).items():
        prefix = next(n for n, m in model.named_modules() if m is mod)
        out[gname] = {f"{prefix}.{n}": p for n, p in mod.named_parameters() if p.dim() == 2}
    return out
