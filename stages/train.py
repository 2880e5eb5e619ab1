"""Stage train: params seed, lambda_entropy, model, train, surge, tracking -> data/model/,
reports/train/ (curves, events, run.json), data/checkpoints/ (persisted; resume after a kill).
"""

import json
import sys
from pathlib import Path

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
    save_file({n: m.to(dtype=__import__("torch").uint8).contiguous()
               for n, m in trainer.masks.masks.items()}, str(MODEL / "masks.safetensors"))
    prunable_names = [n for g in prunable(trainer.model).values() for n in g]
    (MODEL / "config.json").write_text(json.dumps(
        {"model": params["model"], "vocab_size": meta["vocab_size"], "kind": meta["kind"],
         "prunable": prunable_names, "steps": trainer.step}, indent=2) + "\n")


@stage_main
def main(params: dict) -> None:
    seed_everything(params["seed"], params["train"]["threads"])
    meta = load_meta(DATA)
    train, val = load_split(DATA, "train"), load_split(DATA, "val")
    model = build_model(params["model"], meta["vocab_size"])
    cfg = TrainConfig.from_params(params)
    schedule = build_schedule(params["surge"], cfg.steps, params["seed"])
    ckpt = Checkpointer(CKPT, params["train"]["checkpoint_every"],
                        fingerprint=file_hash("params.yaml", DATA))
    resume = ckpt.load()
    curves = CurvesHook()
    REPORTS.mkdir(parents=True, exist_ok=True)
    try:
        with stage_run("train", params, run_id=resume and resume["run_id"]) as tracker:
            ckpt.run_id = tracker.run_id
            (REPORTS / "run.json").write_text(json.dumps({"run_id": tracker.run_id}) + "\n")
            hooks = [schedule, curves, MLflowHook(tracker, params["tracking"]["snapshot_every"],
                                                  REPORTS), ckpt]
            trainer = Trainer(model, train, val, cfg, hooks)
            if resume:
                trainer.load_state_dict(resume["trainer"])
                print(f"train: resuming from step {trainer.step} (run {tracker.run_id})")
            n_params = sum(p.numel() for p in model.parameters())
            print(f"train: {params['model']['arch']} ({n_params:,} parameters), "
                  f"surge.mode={params['surge']['mode']}, lambda_entropy={cfg.lambda_entropy}, "
                  f"{cfg.steps} steps")
            try:
                trainer.fit()
            except DivergenceError as err:
                tracker.log_metrics({"diverged_at_step": err.step}, err.step)
                raise
            curves.write(trainer, REPORTS)
            save_model(trainer, params, meta)
            tracker.log_metrics({"final/val_loss": trainer.val_history[-1][1]}, trainer.step)
            tracker.log_artifact(REPORTS, "train")
            tracker.log_artifact(MODEL, "model")
    except DivergenceError as err:
        print(f"train: {err}; last good checkpoint kept in {CKPT}", file=sys.stderr)
        raise SystemExit(1) from None
    ckpt.clear()
    CKPT.mkdir(parents=True, exist_ok=True)
    (CKPT / "status.json").write_text(json.dumps({"complete": True, "steps": trainer.step}) + "\n")
    print(f"train: done, val loss {trainer.val_history[-1][1]:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
