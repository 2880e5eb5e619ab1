"""Stage train: params seed, lambda_entropy, model, train, surge, tracking -> data/model/,
reports/train/ (curves, events, run.json), data/checkpoints/ (persisted; resume after a kill).

Resume: every `train.checkpoint_every` steps the full training state is written atomically to
data/checkpoints/last.safetensors (see lfmodel.checkpoint). A rerun with the same params and
data (e.g. `dvc repro` after a kill) resumes from it into the same MLflow run and ends with the
same weights and metrics as an uninterrupted run. The work is lfmodel.experiment.train.
"""

import sys

from lfmodel.config import stage_main
from lfmodel.experiment import MODEL, TrainStopped, train


@stage_main
def main(params: dict) -> None:
    try:
        trainer = train(params)
    except TrainStopped as err:
        print(f"train: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    print(f"train: done, val loss {trainer.val_history[-1][1]:.4f} -> {MODEL}")


if __name__ == "__main__":
    main()
