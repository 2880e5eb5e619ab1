"""Stage train: params seed, lambda_entropy, model, train, surge, tracking -> data/model/,
reports/train/ (curves, events, run.json), data/checkpoints/ (persisted; resume after a kill).

Resume: every `train.checkpoint_every` steps the full training state is written atomically to
data/checkpoints/last.safetensors (see lfmodel.checkpoint). A rerun with the same params and
data (e.g. `dvc repro` after a kill) resumes from it into the same MLflow run and ends with the
same weights and metrics as an uninterrupted run.

Test hook: LFMODEL_FAULT_NAN_AT_STEP=N poisons the weights after step N-1, so the loss of step N
is NaN (exercises the divergence guard end to end; never set it otherwise).
"""

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from lfmodel.checkpoint import Checkpointer
from lfmodel.config import stage_main
from lfmodel.curves import CurvesHook
from lfmodel.data import load_meta, load_split
from lfmodel.models import build_model, prunable
from lfmodel.sparsity import build_schedule
from lfmodel.tracking import MLflowHook, file_hash, stage_run
from lfmodel.training import DivergenceError, TrainConfig, Trainer, seed_everything

DATA, MODEL, REPORTS, CKPT = (Path("data/prepared"), Path("data/model"), Path("reports/train"),
                              Path("data/checkpoints"))


def save_model(trainer: Trainer, params: dict, meta: dict) -> None:
    MODEL.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, str(MODEL / "model.safetensors"))
    save_file({n: m.to(dtype=torch.uint8).contiguous()
               for n, m in trainer.masks.masks.items()}, str(MODEL / "masks.safetensors"))
    prunable_names = [n for g in prunable(trainer.model).values() for n in g]
    (MODEL / "config.json").write_text(json.dumps(
        {"model": params["model"], "vocab_size": meta["vocab_size"], "kind": meta["kind"],
         "prunable": prunable_names, "steps": trainer.step}, indent=2) + "\n")


class NaNFault:
    """Test hook (LFMODEL_FAULT_NAN_AT_STEP): fill the first weight tensor with NaN after step
    `at - 1` (after the checkpointer ran), so step `at` sees a non-finite loss."""

    def __init__(self, at: int) -> None:
        self.at = at

    def _poison(self, trainer: Trainer) -> None:
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.step == self.at - 1:
            self._poison(trainer)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        if step == self.at - 1:
            self._poison(trainer)


def fault_hooks() -> list:
    at = os.environ.get("LFMODEL_FAULT_NAN_AT_STEP")
    return [NaNFault(int(at))] if at else []


@stage_main
def main(params: dict) -> None:
    seed_everything(params["seed"], params["train"]["threads"])
    meta = load_meta(DATA)
    train, val = load_split(DATA, "train"), load_split(DATA, "val")
    model = build_model(params["model"], meta["vocab_size"])
    cfg = TrainConfig.from_params(params)
    schedule = build_schedule(params["surge"], cfg.steps, params["seed"])
    ckpt = Checkpointer(CKPT, params["train"]["checkpoint_every"],
                        fingerprint=file_hash("params.yaml", DATA), mirror=REPORTS / "sparsity")
    resume = ckpt.load()
    curves = CurvesHook()
    REPORTS.mkdir(parents=True, exist_ok=True)
    if not resume:  # a run outside DVC may find stale snapshots of an earlier run
        shutil.rmtree(REPORTS / "sparsity", ignore_errors=True)
    trainer = None
    try:
        with stage_run("train", params, run_id=resume["run_id"] if resume else None) as tracker:
            ckpt.run_id, ckpt.tracker = tracker.run_id, tracker
            (REPORTS / "run.json").write_text(json.dumps({"run_id": tracker.run_id}) + "\n")
            mlflow_hook = MLflowHook(tracker, params["tracking"]["snapshot_every"], REPORTS)
            hooks = [schedule, curves, mlflow_hook, ckpt, *fault_hooks()]
            trainer = Trainer(model, train, val, cfg, hooks)
            if resume:
                ckpt.restore(trainer, resume)
                mlflow_hook.event_counts = dict(Counter(e["rule"] for e in trainer.events))
                print(f"train: resuming from step {trainer.step} (run {tracker.run_id})")
            n_params = sum(p.numel() for p in model.parameters())
            print(f"train: {params['model']['arch']} ({n_params:,} parameters), "
                  f"surge.mode={params['surge']['mode']}, lambda_entropy={cfg.lambda_entropy}, "
                  f"{cfg.steps} steps", flush=True)
            try:
                trainer.fit()
            except DivergenceError as err:
                tracker.log_metrics({"diverged_at_step": err.step}, err.step)
                tracker.set_tags({"lfmodel.diverged_at_step": err.step})
                raise
            curves.write(trainer, REPORTS)
            save_model(trainer, params, meta)
            tracker.log_metrics({"final/val_loss": trainer.val_history[-1][1]}, trainer.step)
            tracker.log_artifact(REPORTS, "train")
            tracker.log_artifact(MODEL, "model")
    except DivergenceError as err:
        kept = (f"last good checkpoint (step {ckpt.saved_step}) kept in {ckpt.path}; a rerun "
                "with the same params resumes from it" if ckpt.saved_step is not None
                else "no checkpoint was written before it")
        print(f"train: {err}; {kept}. Change the params (e.g. lower train.lr) to start over.",
              file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as err:
        step = trainer.step if trainer is not None else 0
        kept = (f"rerun to resume from the checkpoint of step {ckpt.saved_step}"
                if ckpt.saved_step is not None else "no checkpoint yet")
        print(f"train: interrupted at step {step} ({err or 'Ctrl-C'}); {kept}", file=sys.stderr)
        raise SystemExit(143 if "signal" in str(err) else 130) from None
    ckpt.clear()
    CKPT.mkdir(parents=True, exist_ok=True)
    (CKPT / "status.json").write_text(json.dumps({"complete": True, "steps": trainer.step}) + "\n")
    print(f"train: done, val loss {trainer.val_history[-1][1]:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
