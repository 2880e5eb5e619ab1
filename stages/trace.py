"""Stage trace: data/model + data/prepared -> reports/traces/ (entropy traces of the test
split) and reports/samples.md (sampled continuations): the outputs that run the model. It
logs nothing (evaluate logs both into the run), so MLflow is imported only to mark the run
FAILED if it fails (tracking.unlogged_stage).

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

from lfmodel.artifacts import load_model, load_split
from lfmodel.config import stage_main
from lfmodel.data import load_meta
from lfmodel.evaluation import by_position
from lfmodel.runtime import select_device, set_threads
from lfmodel.sampling import write_samples
from lfmodel.traces import trace
from lfmodel.tracking import unlogged_stage

OUT, SAMPLES = Path("reports/traces"), Path("reports/samples.md")


@stage_main
def main(params: dict) -> None:
    # The thread count fixes the float sums; the seed drives the sampler only.
    set_threads(params["train"]["threads"])
    device = select_device(params["train"]["device"])
    with unlogged_stage("trace", params):  # a failure still marks the MLflow run
        model = load_model("data/model")[0].to(device)
        test = load_split("data/prepared", "test")
        traces = trace(model, test)
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        by_position(traces["tokens"]).to_csv(OUT / "output_by_position.csv", index=False)
        for name in ("tokens", "layers", "layer_positions", "experts", "gates"):
            traces[name].to_parquet(OUT / f"{name}.parquet", index=False)
        if write_samples(model, test, load_meta("data/prepared"), SAMPLES,
                         seed=params["seed"]) is None:  # a stage output: say why it is empty
            SAMPLES.write_text("# Samples\n\nNo sampled continuations: entropy-adaptive "
                               "sampling applies to token data, this run is a series "
                               "regression.\n")
    print(f"trace: {len(traces['tokens'])} tokens -> {OUT}, samples -> {SAMPLES}")


if __name__ == "__main__":
    main()
