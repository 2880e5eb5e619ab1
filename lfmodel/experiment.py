"""The train stage's work: build data, model, schedule and hooks from params, train into one
MLflow run (resuming from a checkpoint of the same params and data), write the model folder.

Folders (relative to the working directory, as dvc.yaml declares them):
    data/prepared  in: the prepared splits and meta.json
    data/model     out: model.safetensors, masks.safetensors, config.json (lfmodel.artifacts)
    reports/train  out: curves, events.csv, run.json, sparsity snapshots
    data/checkpoints  persisted: last.safetensors while running, status.json when done
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from lfmodel.artifacts import load_split, save_model
from lfmodel.checkpoint import Checkpointer, fingerprint
from lfmodel.curves import CurvesHook
from lfmodel.data import load_meta
from lfmodel.faults import fault_hooks
from lfmodel.models import build_model
from lfmodel.runtime import check_resources
from lfmodel.sparsity import build_schedule
from lfmodel.tracking import RUN_FILE, MLflowHook, TrackingUnavailable, file_hash, stage_run
from lfmodel.training import DivergenceError, TrainConfig, Trainer, seed_everything

DATA, MODEL, REPORTS, CKPT = (Path("data/prepared"), Path("data/model"), Path("reports/train"),
                              Path("data/checkpoints"))


class TrainStopped(Exception):
    """Training stopped before the end (divergence, signal, tracking server gone): the message
    says what is kept;
    `exit_code` is what the stage exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def train(params: dict) -> Trainer:
    """Train per params into data/model and reports/train; raises TrainStopped."""
    device = check_resources(params)  # ParamsError (exit 2) before anything is written
    threads = seed_everything(params["seed"], params["train"]["threads"])
    meta = load_meta(DATA)
    train_split, val = load_split(DATA, "train"), load_split(DATA, "val")
    model = build_model(params["model"], meta["vocab_size"]).to(device)
    cfg = TrainConfig.from_params(params)
    schedule = build_schedule(params["surge"], cfg.steps, params["seed"])
    ckpt = Checkpointer(CKPT, params["train"]["checkpoint_every"],
                        fingerprint=fingerprint(params, file_hash(DATA)), mirror=REPORTS / "sparsity")
    resume = ckpt.load()
    curves = CurvesHook()
    REPORTS.mkdir(parents=True, exist_ok=True)
    if not resume:  # a run outside DVC may find stale snapshots of an earlier run
        shutil.rmtree(REPORTS / "sparsity", ignore_errors=True)
    trainer = None
    try:
        with stage_run("train", params, run_id=resume["run_id"] if resume else None) as tracker:
            ckpt.run_id, ckpt.tracker = tracker.run_id, tracker
            Path(RUN_FILE).write_text(json.dumps({"run_id": tracker.run_id}) + "\n")
            mlflow_hook = MLflowHook(tracker, params["tracking"]["snapshot_every"], REPORTS)
            hooks = [schedule, curves, mlflow_hook, ckpt, *fault_hooks()]
            trainer = Trainer(model, train_split, val, cfg, hooks)
            tracker.set_tags({"lfmodel.threads_used": threads, "lfmodel.device": str(device)})
            if resume:
                ckpt.restore(trainer, resume)
                mlflow_hook.event_counts = dict(Counter(e["rule"] for e in trainer.events))
                print(f"train: resuming from step {trainer.step} (run {tracker.run_id})")
            n_params = sum(p.numel() for p in model.parameters())
            print(f"train: {params['model']['arch']} ({n_params:,} parameters), "
                  f"surge.mode={params['surge']['mode']}, lambda_entropy={cfg.lambda_entropy}, "
                  f"{cfg.steps} steps on {device} ({threads} thread{'s' * (threads > 1)})",
                  flush=True)
            try:
                trainer.fit()
            except DivergenceError as err:
                tracker.log_metrics({"diverged_at_step": err.step}, err.step)
                tracker.set_tags({"lfmodel.diverged_at_step": err.step})
                raise
            curves.write(trainer, REPORTS)
            save_model(MODEL, trainer.model, trainer.masks, params, meta, trainer.step)
            tracker.log_metrics({"final/val_loss": trainer.val_history[-1][1]}, trainer.step)
            tracker.log_artifact(REPORTS, "train")
            tracker.log_artifact(MODEL, "model")
    except DivergenceError as err:
        kept = (f"last good checkpoint (step {ckpt.saved_step}) kept in {ckpt.path}; a rerun "
                "with the same params resumes from it" if ckpt.saved_step is not None
                else "no checkpoint was written before it")
        raise TrainStopped(f"{err}; {kept}. Change the params (e.g. lower train.lr) to start "
                           "over.", 1) from None
    except TrackingUnavailable as err:
        step = trainer.step if trainer is not None else 0
        kept = (f"checkpoint of step {ckpt.saved_step} kept in {ckpt.path}; rerun when the "
                "server is back to resume into the same run" if ckpt.saved_step is not None
                else "no checkpoint yet; a rerun starts over")
        raise TrainStopped(f"{err}; stopped at step {step}, {kept}", 1) from None
    except KeyboardInterrupt as err:
        step = trainer.step if trainer is not None else 0
        kept = (f"rerun to resume from the checkpoint of step {ckpt.saved_step}"
                if ckpt.saved_step is not None else "no checkpoint yet")
        raise TrainStopped(f"interrupted at step {step} ({err or 'Ctrl-C'}); {kept}",
                           143 if "signal" in str(err) else 130) from None
    ckpt.clear()
    CKPT.mkdir(parents=True, exist_ok=True)
    (CKPT / "status.json").write_text(json.dumps({"complete": True, "steps": trainer.step}) + "\n")
    return trainer
