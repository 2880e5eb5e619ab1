"""Stage trace: data/model + data/prepared -> reports/traces/ (entropy traces of the test split).

CSV for what `dvc plots` reads, Parquet for the rest:
    output_by_position.csv   per position: mean test NLL, output entropy and varentropy, Bayes NLL
    tokens.parquet           per token: output entropy/varentropy, nll, per MoE layer the gate
                             distribution, its entropy, max and top expert, the true regime (if
                             known), and per layer the token's activation entropy (`act.<layer>`)
    layers.parquet           per layer: mean (and std) normalized activation entropy
    layer_positions.parquet  per layer and position: mean normalized activation entropy
    experts.parquet          per MoE layer and expert: mean gate probability, top-1 share
    gates.parquet            per MoE layer: token and usage entropy of the gates
"""

import shutil
from pathlib import Path

from lfmodel.artifacts import load_model
from lfmodel.config import stage_main
from lfmodel.data import load_split
from lfmodel.evaluation import by_position, trace
from lfmodel.runtime import select_device, set_threads
from lfmodel.tracking import read_run_file, server_loss_exits, stage_run

OUT = Path("reports/traces")


@stage_main
def main(params: dict) -> None:
    # Evaluation only: no randomness to seed; the thread count fixes the float sums.
    set_threads(params["train"]["threads"])
    device = select_device(params["train"]["device"])
    run_id = read_run_file()["run_id"]
    with server_loss_exits("trace"), stage_run("trace", params, run_id=run_id) as tracker:
        model = load_model("data/model")[0].to(device)
        traces = trace(model, load_split("data/prepared", "test"))
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        by_position(traces["tokens"]).to_csv(OUT / "output_by_position.csv", index=False)
        for name in ("tokens", "layers", "layer_positions", "experts", "gates"):
            traces[name].to_parquet(OUT / f"{name}.parquet", index=False)
        tracker.log_metrics({f"trace/act_entropy/{r.layer}": r.activation_entropy
                             for r in traces["layers"].itertuples()}, step=0)
        tracker.log_artifact(OUT, "traces")
    print(f"trace: {len(traces['tokens'])} tokens -> {OUT}")


if __name__ == "__main__":
    main()
