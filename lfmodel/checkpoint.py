"""Checkpoints without pickle: tensors in safetensors, everything else as JSON metadata.

`save_state` / `load_state` round-trip any nest of dicts, lists, tuples, numbers, strings and
tensors (model, optimizer, RNG states, controller state, the MLflow run id) in one file,
written to a temp name and renamed, so a kill mid-write never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors, f"{path}.k{i}"),
                              _encode(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, float) and obj != obj:
        return {"__float__": "nan"}
    return obj


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
    return obj


def save_state(path: str | Path, state: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors, "s")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"skeleton": json.dumps(skeleton)})
    os.replace(tmp, path)


def load_state(path: str | Path) -> Any:
    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()["skeleton"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(skeleton, tensors)


class Checkpointer:
    """Trainer hook: every `every` steps, save trainer state + run id + fingerprint.

    The fingerprint (hash of params and data) guards resume: a checkpoint from other params is
    ignored. The train stage removes the checkpoint when training completes.
    """

    def __init__(self, directory: str | Path, every: int, fingerprint: str) -> None:
        self.path = Path(directory) / "last.safetensors"
        self.every = every
        self.fingerprint = fingerprint
        self.run_id: str | None = None

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        state = load_state(self.path)
        return state if state.get("fingerprint") == self.fingerprint else None

    def save(self, trainer: Any) -> None:
        save_state(self.path, {"fingerprint": self.fingerprint, "run_id": self.run_id,
                               "trainer": trainer.state_dict()})

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if step % self.every == 0 and step < trainer.cfg.steps:
            self.save(trainer)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
