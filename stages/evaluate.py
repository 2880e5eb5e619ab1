"""Stage evaluate: traces + model + data -> reports/metrics.json and reports/figures/*.png;
logs them, the traces and the samples into the pipeline's MLflow run. Reads files only: no
torch (lfmodel.evaluation)."""

import json
from pathlib import Path

import pandas as pd

from lfmodel.config import stage_main
from lfmodel.evaluation import figures, metrics
from lfmodel.tracking import read_run_file, server_loss_exits, stage_run

OUT, TRAIN, TRACES = Path("reports"), Path("reports/train"), Path("reports/traces")


@stage_main
def main(params: dict) -> None:
    run_id = read_run_file()["run_id"]
    with server_loss_exits("evaluate"), stage_run("evaluate", params, run_id=run_id) as tracker:
        meta = json.loads(Path("data/prepared/meta.json").read_text())
        result = metrics(meta, TRACES, Path("data/model"), TRAIN)
        (OUT / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        made = figures(OUT / "figures", TRAIN, TRACES, meta)
        layers = pd.read_parquet(TRACES / "layers.parquet")
        tracker.log_metrics({f"trace/act_entropy/{r.layer}": r.activation_entropy
                             for r in layers.itertuples()}, step=0)
        tracker.log_metrics({k: v for k, v in result.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
        tracker.log_artifact(TRACES, "traces")
        tracker.set_tags({"dvc.stage.trace": "done"})  # trace logs nothing itself
        tracker.log_artifact(OUT / "samples.md")
        tracker.log_artifact(OUT / "metrics.json")
        for f in made:
            tracker.log_artifact(f, "figures")
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
             if k in ("test_loss", "baseline_loss", "bayes_loss", "excess_loss", "sparsity")}
    # run id not in metrics.json (it would make the file differ per run): logged-into run here
    print(f"evaluate: {shown} -> {OUT / 'metrics.json'} (MLflow run {tracker.run_id})")


if __name__ == "__main__":
    main()
