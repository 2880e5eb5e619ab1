"""The metrics and figures of a trained model, from its traces (lfmodel.traces) and folders.

No torch here: the evaluate stage reads files only (numpy, pandas, safetensors as numpy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open


def measured_sparsity(model_dir: str | Path) -> float:
    """Zero fraction of the prunable weights, read from model.safetensors itself."""
    model_dir = Path(model_dir)
    names = json.loads((model_dir / "config.json").read_text())["prunable"]
    zeros = total = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="numpy") as f:
        for n in names:
            w = f.get_tensor(n)
            zeros += int(np.count_nonzero(w == 0))
            total += w.size
    return zeros / max(total, 1)


def gate_columns(table: pd.DataFrame) -> dict[str, list[str]]:
    """{MoE layer: its gate columns `<layer>.g0, .g1, ...` in expert order}, layers in table order.

    The one parser of the trace's gate-column names (trace, gate_summary and figures use it).
    """
    found: dict[str, dict[int, str]] = {}
    for c in table.columns:
        layer, _, rest = c.partition(".")
        if rest[:1] == "g" and rest[1:].isdigit():
            found.setdefault(layer, {})[int(rest[1:])] = c
    return {layer: [cols[e] for e in sorted(cols)] for layer, cols in found.items()}


def by_position(table: pd.DataFrame) -> pd.DataFrame:
    """Mean per position of the test NLL, output entropy and varentropy (and Bayes NLL)."""
    cols = [c for c in ("nll", "entropy", "varentropy", "bayes_nll") if c in table]
    return table.groupby("position", as_index=False)[cols].mean()


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats between two label sequences of equal length (empirical joint)."""
    _, ai = np.unique(np.ravel(a), return_inverse=True)
    _, bi = np.unique(np.ravel(b), return_inverse=True)
    joint = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(joint, (ai.ravel(), bi.ravel()), 1)
    joint /= joint.sum()
    nz = joint > 0
    indep = np.outer(joint.sum(1), joint.sum(0))
    return float((joint[nz] * np.log(joint[nz] / indep[nz])).sum())


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized mutual information 2 I(a;b) / (H(a) + H(b)) in [0, 1], with H(a) = I(a;a).

    0 when both are constant (nothing to share).
    """
    ha, hb = mutual_information(a, a), mutual_information(b, b)
    return 0.0 if ha + hb == 0 else 2 * mutual_information(a, b) / (ha + hb)


DEAD_SHARE = 0.01  # an expert that is top-1 for fewer tokens than this is dead


def gate_summary(tokens: pd.DataFrame, gates: pd.DataFrame) -> dict[str, float | None]:
    """Gate metrics from the trace: `gates` (per-layer entropies) and `tokens` (top experts).

    token_entropy, usage_entropy: mean over MoE layers of the trace's per-layer values;
    expert_regime_nmi / expert_token_nmi: NMI of the top expert with the regime (of the target
    token: the regime that emits the token being predicted) / with the input token, the best
    layer; per layer `<layer>.token_entropy`, `.usage_entropy`, `.expert_regime_nmi`, and for
    the lambda sub-study (issue 13) `.expert_regime_mi` / `.expert_token_mi` (the same pairs'
    mutual information in nats), `.top_share` (the most used expert's share of tokens, by top-1)
    and `.dead_share` (the share of experts that are top-1 for fewer than DEAD_SHARE of tokens).
    """
    if not len(gates):
        return {"token_entropy": None, "usage_entropy": None, "expert_regime_nmi": None,
                "expert_token_nmi": None}
    layers = list(gates["layer"])
    tops = {layer: tokens[f"{layer}.top_expert"].to_numpy() for layer in layers}
    reg = ({layer: nmi(top, tokens["regime"].to_numpy()) for layer, top in tops.items()}
           if "regime" in tokens else {})
    inp = ([nmi(top, tokens["input"].to_numpy()) for top in tops.values()]
           if tokens["input"].dtype.kind == "i" else [])
    out: dict[str, float | None] = {
        "token_entropy": float(gates["token_entropy"].mean()),
        "usage_entropy": float(gates["usage_entropy"].mean()),
        "expert_regime_nmi": max(reg.values()) if reg else None,
        "expert_token_nmi": max(inp) if inp else None}
    n_experts = {layer: len(cols) for layer, cols in gate_columns(tokens).items()}
    for r in gates.itertuples():
        top = tops[r.layer]
        out[f"{r.layer}.token_entropy"] = float(r.token_entropy)
        out[f"{r.layer}.usage_entropy"] = float(r.usage_entropy)
        if reg:
            out[f"{r.layer}.expert_regime_nmi"] = reg[r.layer]
            out[f"{r.layer}.expert_regime_mi"] = mutual_information(top, tokens["regime"].to_numpy())
        if inp:
            out[f"{r.layer}.expert_token_mi"] = mutual_information(top, tokens["input"].to_numpy())
        share = np.bincount(top, minlength=n_experts[r.layer]) / max(len(top), 1)
        out[f"{r.layer}.top_share"] = float(share.max())
        out[f"{r.layer}.dead_share"] = float((share < DEAD_SHARE).mean())
    return out


def stability(loss_csv: str | Path, tail: float = 0.2) -> float:
    """Variance of the per-step training loss over the last `tail` of steps."""
    losses = pd.read_csv(loss_csv)["train_loss"].to_numpy()
    k = max(2, math.ceil(tail * len(losses)))
    return float(np.var(losses[-k:]))


def metrics(meta: dict, traces_dir: Path, model_dir: Path, train_dir: Path) -> dict:
    """reports/metrics.json: losses against the baselines, sparsity, gate measures, stability."""
    tokens = pd.read_parquet(traces_dir / "tokens.parquet")
    gates = pd.read_parquet(traces_dir / "gates.parquet")
    test_loss = float(tokens["nll"].mean())
    bayes = meta.get("bayes_loss_test")
    return {
        "test_loss": test_loss,
        "baseline_loss": meta["baseline_loss"],
        "baseline": meta["baseline"],
        "bayes_loss": bayes,
        "excess_loss": test_loss - bayes if bayes is not None else None,
        "oracle_loss": meta.get("oracle_loss_test"),
        "unigram_loss": meta.get("unigram_loss"),
        "sparsity": measured_sparsity(model_dir),
        **gate_summary(tokens, gates),
        "output_entropy": float(tokens["entropy"].mean()) if "entropy" in tokens else None,
        "output_varentropy": (float(tokens["varentropy"].mean()) if "varentropy" in tokens
                              else None),
        "train_loss_var_last20": stability(train_dir / "loss.csv"),
        "val_loss": float(pd.read_csv(train_dir / "val.csv")["val_loss"].iloc[-1]),
    }


def figures(out_dir: Path, train_dir: Path, traces_dir: Path,
            meta: dict | None = None) -> list[Path]:
    """PNG figures: loss curves (with the Bayes and baseline levels from `meta`), sparsity,
    activation entropy over steps, output entropy by position, expert use (by regime if known).
    """
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
    if meta:
        if meta.get("bayes_loss_val") is not None:
            ax.axhline(meta["bayes_loss_val"], color="k", ls="--", lw=1, label="bayes (val)")
        ax.axhline(meta["baseline_loss"], color="gray", ls=":", lw=1,
                   label=f"{meta['baseline']} (test)")
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
    ax.set_ylabel("nats" if "entropy" in pos else "squared error")
    ax.legend()
    save(fig, "output_by_position.png")

    tokens_path = traces_dir / "tokens.parquet"
    tops = []
    if tokens_path.exists():
        tokens = pd.read_parquet(tokens_path)
        tops = sorted(c for c in tokens.columns if c.endswith(".top_expert"))
    if tops:  # one panel per MoE layer: top expert by regime, or expert use if none known
        fig, axes = plt.subplots(1, len(tops), figsize=(3.2 * len(tops), 3), squeeze=False)
        for ax, col in zip(axes[0], tops, strict=True):
            layer = col.split(".")[0]
            n_exp = len(gate_columns(tokens)[layer])
            if "regime" in tokens:  # row: a regime's tokens, split by top expert (all experts)
                tab = pd.crosstab(tokens["regime"], tokens[col], normalize="index").reindex(
                    columns=range(n_exp), fill_value=0.0)
                im = ax.imshow(tab.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(tab.shape[1]), tab.columns)
                ax.set_yticks(range(tab.shape[0]), tab.index)
                ax.set_xlabel("top expert")
                ax.set_ylabel("true regime")
                fig.colorbar(im, ax=ax, fraction=0.046)
            else:
                share = tokens[col].value_counts(normalize=True).reindex(range(n_exp),
                                                                         fill_value=0.0)
                ax.bar(share.index.astype(str), share.to_numpy())
                ax.set_xlabel("top expert")
                ax.set_ylabel("share of tokens")
            ax.set_title(layer)
        save(fig, "experts.png")
    return made
