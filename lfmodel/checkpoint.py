"""Checkpoints without pickle: tensors in safetensors, everything else as JSON metadata.

`save_state` / `load_state` round-trip any nest of dicts, lists, tuples, numbers, strings and
tensors (model, optimizer, RNG states, controller state, the MLflow run id) in one file,
written to a temp name, fsynced, renamed and the folder fsynced, so neither a kill mid-write
nor a power loss right after leaves a torn or vanished checkpoint.

`Checkpointer` is the train stage's hook. What a bit-exact resume needs, and where it lives:
  * `Trainer.state_dict()`: step, weights, Adam state, masks, batch generator, torch's global
    RNG, losses, events, val history, and every hook with a `state_dict` (curves, controller);
  * here (`capture_extra` / `restore_extra`): python and numpy RNGs, the lr of the last step
    (events report it), per-group input noise and last activation entropy (controller state
    that lives on the model), and the state of every hook's own `torch.Generator` (the
    schedules' surge/regrow draws);
  * files that hooks wrote into a non-persisted output (the sparsity snapshots under
    reports/train/sparsity/, which DVC deletes before rerunning the stage) are mirrored next to
    the checkpoint, in a folder named by its fingerprint, and put back on resume. Snapshots of
    other params have the same names and sizes: a folder of their own keeps them from ever
    being put back into this run;
  * the tracker is flushed before each save, so MLflow holds every metric up to the checkpoint
    even after a SIGKILL. Metrics logged between the last checkpoint and a kill are logged
    again (same steps, same values) by the resumed run. A flush that fails (the tracking server
    went away) raises before the write, so no checkpoint claims steps MLflow never got.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
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
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename lives in the folder's entry
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path: str | Path) -> Any:
    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads(f.metadata()["skeleton"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _decode(skeleton, tensors)


def capture_extra(trainer: Any) -> dict[str, Any]:
    """Resume state the trainer's own state_dict leaves out (see the module docstring)."""
    np_state = np.random.get_state()
    return {
        "python_rng": random.getstate(),
        "numpy_rng": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *[float(v) if isinstance(v, float) else int(v) for v in np_state[2:]]],
        "current_lr": trainer.current_lr,
        "groups": {name: {"input_noise": float(g.input_noise), "act_entropy": g.act_entropy}
                   for name, g in trainer.groups.items()},
        "generators": {f"{i}:{type(h).__name__}": h.generator.get_state()
                       for i, h in enumerate(trainer.hooks)
                       if isinstance(getattr(h, "generator", None), torch.Generator)},
    }


def restore_extra(trainer: Any, extra: dict[str, Any]) -> None:
    v, state, gauss = extra["python_rng"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = extra["numpy_rng"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    trainer.current_lr = extra["current_lr"]
    for name, g in trainer.groups.items():
        if name in extra["groups"]:
            g.input_noise = extra["groups"][name]["input_noise"]
            g.act_entropy = extra["groups"][name]["act_entropy"]
    for i, h in enumerate(trainer.hooks):
        key = f"{i}:{type(h).__name__}"
        if key in extra["generators"]:
            h.generator.set_state(extra["generators"][key])


# What the train stage reads (dvc.yaml); `data` enters through the hash of the prepared data.
TRAINING_PARAMS = ("seed", "lambda_entropy", "model", "train", "surge", "tracking")


def fingerprint(params: dict, data_hash: str) -> str:
    """Which run a checkpoint belongs to: the validated params train reads, as canonical JSON,
    plus the prepared data's hash. A comment or key order in params.yaml does not change it;
    an edited value, or other data, does (and the checkpoint is then ignored)."""
    used = {k: params[k] for k in TRAINING_PARAMS}
    text = json.dumps(used, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(f"{text}\n{data_hash}".encode()).hexdigest()[:16]


_STEP_FILE = re.compile(r"step_(\d+)\.")


class Checkpointer:
    """Trainer hook: every `every` steps, save trainer state + run id + fingerprint.

    The fingerprint (`fingerprint(params, data_hash)`) guards resume: a checkpoint from other params is
    ignored. `mirror` is a folder of files written during training into an output DVC deletes
    before a rerun (named step_N.*; copied next to the checkpoint into a folder of its
    fingerprint, restored on resume).
    A checkpoint is only written while all weights are finite: it is always a "last good" one.
    The train stage removes the checkpoint when training completes.
    """

    def __init__(self, directory: str | Path, every: int, fingerprint: str,
                 mirror: str | Path | None = None) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "last.safetensors"
        self.every = every
        self.fingerprint = fingerprint
        self.mirror = Path(mirror) if mirror is not None else None
        self.run_id: str | None = None
        self.tracker: Any = None   # flushed before each save
        self.saved_step: int | None = None

    @property
    def _mirrors(self) -> Path:
        return self.dir / "mirror"

    @property
    def _mirror_copy(self) -> Path:
        """This fingerprint's mirrored files: another run's, same names and sizes, live apart."""
        return self._mirrors / self.fingerprint

    def load(self) -> dict | None:
        """The checkpoint if it exists and matches the fingerprint, else None (a fresh start,
        which drops this fingerprint's mirrored files: they belong to no checkpoint)."""
        state = self._matching_state()
        if state is None:
            shutil.rmtree(self._mirror_copy, ignore_errors=True)
            return None
        self.saved_step = state["trainer"]["step"]
        return state

    def _matching_state(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = load_state(self.path)
        except Exception as err:  # unreadable: start over rather than crash
            print(f"checkpoint: ignoring unreadable {self.path}: {err}", file=sys.stderr)
            return None
        if state.get("fingerprint") != self.fingerprint:
            print(f"checkpoint: ignoring {self.path} (written for other params or data)",
                  file=sys.stderr)
            return None
        return state

    def restore(self, trainer: Any, state: dict) -> None:
        """Put trainer, RNGs and mirrored files back to the checkpoint's step."""
        trainer.load_state_dict(state["trainer"])
        restore_extra(trainer, state["extra"])
        if self.mirror is not None:
            shutil.rmtree(self.mirror, ignore_errors=True)
            if self._mirror_copy.is_dir():
                self.mirror.mkdir(parents=True, exist_ok=True)
                for f in sorted(self._mirror_copy.iterdir()):
                    m = _STEP_FILE.match(f.name)
                    if m is None or int(m.group(1)) <= trainer.step:
                        shutil.copy2(f, self.mirror / f.name)

    def save(self, trainer: Any) -> bool:
        if not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
            print(f"checkpoint: weights not finite at step {trainer.step}; keeping the "
                  f"checkpoint of step {self.saved_step}", file=sys.stderr)
            return False
        if self.tracker is not None:  # a failing flush raises before the write: the previous
            self.tracker.flush()      # checkpoint stays, the rerun logs those steps again
        if self.mirror is not None and self.mirror.is_dir():
            self._mirror_copy.mkdir(parents=True, exist_ok=True)
            for f in self.mirror.iterdir():
                dst = self._mirror_copy / f.name
                # contents, not sizes: every snapshot of one model has the same size
                if f.is_file() and not (dst.exists() and filecmp.cmp(f, dst)):
                    shutil.copy2(f, dst)
        save_state(self.path, {"fingerprint": self.fingerprint, "run_id": self.run_id,
                               "trainer": trainer.state_dict(), "extra": capture_extra(trainer)})
        self.saved_step = trainer.step
        for other in self._mirrors.glob("*"):  # their checkpoint was just overwritten
            if other.is_dir() and other != self._mirror_copy:
                shutil.rmtree(other)
            elif other.is_file():  # the flat layout of earlier versions
                other.unlink()
        return True

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if step % self.every == 0 and step < trainer.cfg.steps:
            self.save(trainer)

    def clear(self) -> None:
        """Training completed: drop the checkpoint, its temp file and the mirrored files."""
        for p in (self.path, self.path.with_name(self.path.name + ".tmp")):
            p.unlink(missing_ok=True)
        shutil.rmtree(self._mirrors, ignore_errors=True)
        self.saved_step = None
