"""Stage trace: data/model + data/prepared -> reports/traces/ (entropy traces of the test split).

CSV for what `dvc plots` reads (output_by_position.csv, layers.csv), Parquet for the per-token
table (tokens.parquet: output entropy/varentropy, nll, gate distribution, top expert, regime).
"""

import shutil
from pathlib import Path

from lfmodel.config import stage_main
from lfmodel.data import load_split
from lfmodel.evaluation import by_position, load_model, trace
from lfmodel.tracking import read_run_file, stage_run
from lfmodel.training import seed_everything

OUT = Path("reports/traces")


@stage_main
def main(params: dict) -> None:
    seed_everything(params["seed"], params["train"]["threads"])
    run_id = read_run_file()["run_id"]
    with stage_run("trace", params, run_id=run_id) as tracker:
        model, _ = load_model("data/model")
        traces = trace(model, load_split("data/prepared", "test"))
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        traces["tokens"].to_parquet(OUT / "tokens.parquet", index=False)
        by_position(traces["tokens"]).to_csv(OUT / "output_by_position.csv", index=False)
        traces["layers"].to_csv(OUT / "layers.csv", index=False)
        tracker.log_metrics({f"trace/act_entropy/{r.layer}": r.activation_entropy
                             for r in traces["layers"].itertuples()}, step=0)
        tracker.log_artifact(OUT, "traces")
    print(f"trace: {len(traces['tokens'])} tokens -> {OUT}")


if __name__ == "__main__":
    main()
