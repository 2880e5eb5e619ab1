"""Training curves as CSV under reports/train/ (what `dvc plots` reads), from trainer hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


class CurvesHook:
    """Collects the step metrics the trainer hands out; `write` turns them into wide CSVs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if metrics:
            self.rows.append({"step": step, **metrics})

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]

    def write(self, trainer: Any, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        steps = range(1, len(trainer.losses) + 1)
        pd.DataFrame({"step": steps, "train_loss": trainer.losses, "lr": trainer.lrs}).to_csv(
            out / "loss.csv", index=False)
        pd.DataFrame(trainer.val_history, columns=["step", "val_loss"]).to_csv(
            out / "val.csv", index=False)
        df = pd.DataFrame(self.rows)
        df = df.groupby("step", as_index=False).last() if len(df) else pd.DataFrame({"step": []})
        for name, prefix in (("sparsity", "sparsity/"), ("activation_entropy", "entropy/act/"),
                             ("gates", "gates/")):
            cols = [c for c in df.columns if c.startswith(prefix)]
            part = df[["step", *cols]].dropna(subset=cols, how="all") if cols else df[["step"]]
            part = part.rename(columns={c: c[len(prefix):] for c in cols})
            if name == "activation_entropy" and cols:
                layer_cols = [c[len(prefix):] for c in cols]
                part["mean"] = part[layer_cols].mean(axis=1)
                part["min"] = part[layer_cols].min(axis=1)
                part["max"] = part[layer_cols].max(axis=1)
            part.to_csv(out / f"{name}.csv", index=False)
        cols = ["step", "layer", "rule", "entries", "sparsity_before", "sparsity_after", "lr"]
        events = pd.DataFrame(trainer.events)
        events = events.reindex(columns=list(dict.fromkeys(cols + list(events.columns))))
        events.to_csv(out / "events.csv", index=False)
