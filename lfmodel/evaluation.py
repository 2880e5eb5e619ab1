"""Entropy traces of a trained model on the test split, the metrics, and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn

from lfmodel.entropy import entropy, entropy_from_logits, varentropy_from_logits
from lfmodel.models import build_model, groups


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict]:
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model = build_model(config["model"], config["vocab_size"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.eval()
    return model, config


def measured_sparsity(model_dir: str | Path) -> float:
    """Zero fraction of the prunable weights, read from model.safetensors itself."""
    model_dir = Path(model_dir)
    names = json.loads((model_dir / "config.json").read_text())["prunable"]
    weights = load_file(str(model_dir / "model.safetensors"))
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    return zeros / max(sum(weights[n].numel() for n in names), 1)


@torch.no_grad()
def trace(model: nn.Module, split: dict[str, torch.Tensor], batch_size: int = 256) -> dict:
    """Per-token table (output entropy/varentropy, nll, gates) and per-layer activation entropy."""
    x, y = split["inputs"], split["targets"]
    n, s = x.shape
    tokens = y.dtype == torch.long
    gs = groups(model)
    cols: dict[str, list[np.ndarray]] = {}
    act: dict[str, list[float]] = {g: [] for g in gs}
    act_pos: dict[str, list[np.ndarray]] = {g: [] for g in gs}

    def add(name: str, value: torch.Tensor) -> None:
        cols.setdefault(name, []).append(value.reshape(-1).cpu().numpy())

    for i in range(0, n, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        for g in gs.values():
            g.monitor = True
        out, gates = model(xb, return_gates=True)
        for name, g in gs.items():
            act[name].append(float(g.act_entropy) * xb.numel())
            g.monitor = False
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
        for key in ("regimes", "bayes_nll"):
            if key in split:
                add("regime" if key == "regimes" else key, split[key][i:i + batch_size])
        for li, g in enumerate(gates):
            add(f"block{li}.top_expert", g.argmax(-1))
            add(f"block{li}.gate_entropy", entropy(g))
            for e in range(g.shape[-1]):
                add(f"block{li}.g{e}", g[..., e])
    table = pd.DataFrame({k: np.concatenate(v) for k, v in cols.items()})
    layers = pd.DataFrame({"layer": list(act),
                           "activation_entropy": [sum(v) / x.numel() for v in act.values()]})
    del act_pos
    return {"tokens": table, "layers": layers}


def by_position(table: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("nll", "entropy", "varentropy", "bayes_nll") if c in table]
    return table.groupby("position", as_index=False)[cols].mean()


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information 2 I(a;b) / (H(a) + H(b)), in [0, 1]."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai, bi), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return 0.0 if ha + hb == 0 else 2 * mi / (ha + hb)


def gate_summary(table: pd.DataFrame) -> dict[str, float | None]:
    """token_entropy = mean_t H(g_t), usage_entropy = H(mean_t g_t), averaged over MoE layers;
    expert_regime_nmi / expert_token_nmi: the best layer's NMI of top expert with regime/input."""
    layers = sorted({c.split(".")[0] for c in table.columns if c.endswith(".top_expert")})
    if not layers:
        return {"token_entropy": None, "usage_entropy": None, "expert_regime_nmi": None,
                "expert_token_nmi": None}
    tok, use, reg, inp = [], [], [], []
    for layer in layers:
        gcols = sorted(c for c in table.columns if c.startswith(f"{layer}.g") and
                       c[len(layer) + 2:].isdigit())
        mean_g = table[gcols].to_numpy().mean(0)
        tok.append(float(table[f"{layer}.gate_entropy"].mean()))
        use.append(float(-(mean_g * np.log(np.clip(mean_g, 1e-30, None))).sum()))
        top = table[f"{layer}.top_expert"].to_numpy()
        if "regime" in table:
            reg.append(nmi(top, table["regime"].to_numpy()))
        if table["input"].dtype.kind == "i":
            inp.append(nmi(top, table["input"].to_numpy()))
    out: dict[str, float | None] = {
        "token_entropy": float(np.mean(tok)), "usage_entropy": float(np.mean(use)),
        "expert_regime_nmi": max(reg) if reg else None,
        "expert_token_nmi": max(inp) if inp else None}
    for layer, t, u in zip(layers, tok, use, strict=True):
        out[f"{layer}.token_entropy"], out[f"{layer}.usage_entropy"] = t, u
    return out


def stability(loss_csv: str | Path, tail: float = 0.2) -> float:
    """Variance of the per-step training loss over the last `tail` of steps."""
    losses = pd.read_csv(loss_csv)["train_loss"].to_numpy()
    k = max(2, math.ceil(tail * len(losses)))
    return float(np.var(losses[-k:]))


def figures(out_dir: Path, train_dir: Path, traces_dir: Path) -> list[Path]:
    """PNG figures: loss curves, sparsity, activation entropy, output entropy by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(out_dir / name)

    loss, val = pd.read_csv(train_dir / "loss.csv"), pd.read_csv(train_dir / "val.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(loss["step"], loss["train_loss"].rolling(20, min_periods=1).mean(), label="train (20-step mean)")
    ax.plot(val["step"], val["val_loss"], "o-", label="val")
    meta_path = Path("data/prepared/meta.json")
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if "bayes_loss_val" in meta:
            ax.axhline(meta["bayes_loss_val"], color="k", ls="--", lw=1, label="bayes (val)")
        ax.axhline(meta["baseline_loss"], color="gray", ls=":", lw=1, label=meta["baseline"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    save(fig, "loss.png")

    for name, title in (("sparsity", "weight sparsity"), ("activation_entropy",
                                                           "normalized activation entropy")):
        df = pd.read_csv(train_dir / f"{name}.csv")
        cols = [c for c in df.columns if c not in ("step", "mean", "min", "max", "all")]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for c in cols:
            ax.plot(df["step"], df[c], lw=1, label=c)
        ax.set_xlabel("step")
        ax.set_title(title)
        if len(cols) <= 12:
            ax.legend(fontsize=6)
        save(fig, f"{name}.png")

    pos = pd.read_csv(traces_dir / "output_by_position.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for c in ("entropy", "nll", "bayes_nll"):
        if c in pos:
            ax.plot(pos["position"], pos[c], label=c)
    ax.set_xlabel("position")
    ax.set_ylabel("nats")
    ax.legend()
    save(fig, "output_by_position.png")
    return made
