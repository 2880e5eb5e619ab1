"""What the torch stages read and write: the prepared splits as tensors (written by prepare
with numpy, lfmodel.data) and the trained model folder (data/model/: weights, masks, config;
written by train, read by trace and sampling). Pickle-free: safetensors plus JSON."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lfmodel.models import build_model, prunable
from lfmodel.sparsity import MaskSet


def load_split(data_dir: str | Path, split: str) -> dict[str, Tensor]:
    """One prepared split (data/prepared/<split>.safetensors) as CPU tensors."""
    return load_file(str(Path(data_dir) / f"{split}.safetensors"))


def save_model(out_dir: str | Path, model: nn.Module, masks: MaskSet, params: dict, meta: dict,
               steps: int) -> None:
    """model.safetensors, masks.safetensors (MaskSet.save) and config.json (what load_model
    needs to rebuild the model, and the prunable names measured_sparsity reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    masks.save(out / "masks.safetensors")
    # the parameters holding prunable weights, each once (an MoE layer's stacked experts too)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = list(dict.fromkeys(name_of[id(p)] for g in prunable(model).values()
                               for p, _ in g.values()))
    (out / "config.json").write_text(json.dumps(
        {"model": params["model"], "vocab_size": meta["vocab_size"], "kind": meta["kind"],
         "prunable": names, "steps": steps}, indent=2) + "\n")


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict]:
    """The saved model in eval mode, and its config.json."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    model = build_model(config["model"], config["vocab_size"])
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    model.eval()
    return model, config
