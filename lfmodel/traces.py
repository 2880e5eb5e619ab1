"""Entropy traces of a trained model on a split: what the trace stage writes to reports/traces/.

The one module of the evaluation that runs the model (torch); lfmodel.evaluation turns its
tables into metrics and figures without torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lfmodel.entropy import (
    entropy,
    entropy_from_logits,
    gate_entropies,
    token_activation_entropy,
    varentropy_from_logits,
)
from lfmodel.evaluation import gate_columns
from lfmodel.models import groups


def trace(model: nn.Module, split: dict[str, Any], batch_size: int = 256) -> dict:
    """Entropy traces of `model` (eval mode) over a split.

    Returns pandas tables:
      tokens    one row per (sequence, position): input, target, nll (squared error for a
                series), output entropy and varentropy (tokens), regime and bayes_nll where
                known, per MoE layer the gate distribution (g0..), its entropy, its largest
                probability and the top expert, and per prunable layer the normalized
                activation entropy of that token (column `act.<layer>`).
      layers    per layer: mean / std of the normalized activation entropy over tokens.
      layer_positions  per (layer, position): mean normalized activation entropy.
      experts   per (MoE layer, expert): mean gate probability and top-1 share.
      gates     per MoE layer: token_entropy = mean_t H(g_t) and usage_entropy = H(mean_t g_t)
                (lfmodel.entropy.gate_entropies over the whole split, in float64).
    """
    split = {k: torch.as_tensor(v) for k, v in split.items()}  # tensors or numpy arrays
    x, y = split["inputs"], split["targets"]
    n, s = x.shape
    tokens = y.dtype == torch.long
    gs = groups(model)
    device = next(model.parameters()).device  # batches go to the model; columns come back
    cols: dict[str, list[np.ndarray]] = {}
    captured: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        cols.setdefault(name, []).append(value.reshape(-1).cpu().numpy())

    def capture(name: str):
        def observe(act: torch.Tensor) -> torch.Tensor:
            captured[name] = token_activation_entropy(act)
            return act
        return observe

    was_training = model.training
    was_monitored = {name: g.monitor for name, g in gs.items()}
    model.eval()
    for name, g in gs.items():  # per-token activation entropy: shadow `observe` on the instance
        g.observe = capture(name)
        g.monitor = True  # a model may call observe only on monitored groups
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
                captured.clear()
                out, gates = model(xb, return_gates=True)
                b = xb.shape[0]
                add("seq", torch.arange(i, i + b)[:, None].expand(b, s))
                add("position", torch.arange(s)[None, :].expand(b, s))
                add("input", xb)
                add("target", yb)
                if tokens:
                    logp = torch.log_softmax(out, -1)
                    add("nll", -logp.gather(-1, yb[..., None]).squeeze(-1))
                    add("entropy", entropy_from_logits(out))
                    add("varentropy", varentropy_from_logits(out))
                else:
                    add("prediction", out.squeeze(-1))
                    add("nll", (out.squeeze(-1) - yb) ** 2)  # squared error for series
                for key, col in (("regimes", "regime"), ("bayes_nll", "bayes_nll")):
                    if key in split:
                        add(col, split[key][i:i + batch_size])
                for li, g in enumerate(gates):
                    add(f"block{li}.top_expert", g.argmax(-1))
                    add(f"block{li}.gate_max", g.max(-1).values)
                    add(f"block{li}.gate_entropy", entropy(g))
                    for e in range(g.shape[-1]):
                        add(f"block{li}.g{e}", g[..., e])
                for name in gs:
                    add(f"act.{name}", captured[name])
    finally:
        for name, g in gs.items():
            del g.observe  # back to the class method
            g.monitor = was_monitored[name]
        model.train(was_training)
    table = pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})
    act_cols = [f"act.{name}" for name in gs]
    layers = pd.DataFrame({"layer": list(gs),
                           "activation_entropy": [float(table[c].mean()) for c in act_cols],
                           "activation_entropy_std": [float(table[c].std()) for c in act_cols]})
    per_pos = table.groupby("position")[act_cols].mean().rename(
        columns=lambda c: c[len("act."):]).reset_index()
    layer_positions = per_pos.melt(id_vars="position", var_name="layer",
                                   value_name="activation_entropy")
    rows, gate_rows = [], []
    for layer, gcols in gate_columns(table).items():
        top = table[f"{layer}.top_expert"].to_numpy()
        for e, c in enumerate(gcols):
            rows.append({"layer": layer, "expert": e, "mean_gate": float(table[c].mean()),
                         "top_share": float((top == e).mean())})
        tok, use = gate_entropies(torch.from_numpy(table[gcols].to_numpy(np.float64, copy=True)))
        gate_rows.append({"layer": layer, "token_entropy": float(tok),
                          "usage_entropy": float(use)})
    experts = pd.DataFrame(rows, columns=["layer", "expert", "mean_gate", "top_share"])
    gate_table = pd.DataFrame(gate_rows, columns=["layer", "token_entropy", "usage_entropy"])
    return {"tokens": table, "layers": layers, "layer_positions": layer_positions,
            "experts": experts, "gates": gate_table}
