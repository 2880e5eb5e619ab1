"""Stage prepare: params `seed`, `data` -> data/prepared/ (splits, meta.json with baselines)."""

import shutil
import sys
from pathlib import Path

from lfmodel.config import params_file, stage_main
from lfmodel.data import build, write

OUT = Path("data/prepared")


@stage_main
def main(params: dict) -> None:
    try:  # data.path is relative to the params file's folder, as validation checked it
        splits, meta = build(params["data"], params["seed"], base=params_file().parent)
    except ValueError as err:  # a bad data file: say so, exit 2 like a bad param
        print(f"prepare: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    shutil.rmtree(OUT, ignore_errors=True)
    write(splits, meta, OUT)
    sizes = ", ".join(f"{k} {v}" for k, v in meta["sizes"].items())
    print(f"prepare: {meta['source']} -> {OUT} ({sizes} sequences); "
          f"{meta['baseline']} baseline {meta['baseline_loss']:.4f}"
          + (f", bayes {meta['bayes_loss_test']:.4f}" if "bayes_loss_test" in meta else ""))


if __name__ == "__main__":
    main()
