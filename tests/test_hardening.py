"""Issue 6 end to end, in one tiny temp git + DVC repo (shared by the tests of this module):

* two `dvc repro -f` give byte-identical reports/metrics.json (and weights);
* a bad params.yaml fails `dvc repro` with one line naming the key (exit 2 from the stage), and
  after the fix `dvc checkout` restores the previous outputs byte for byte, nothing retrained;
* a train stage killed mid-run (SIGTERM, then SIGKILL) resumes into the same MLflow run and
  ends with the weights, curves and MLflow metrics of an uninterrupted run;
* a NaN injected through the LFMODEL_FAULT_NAN_AT_STEP test hook stops training with a clear
  message, marks the MLflow run FAILED with the step, and keeps the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, GIT_ENV, make_repo, merge, run

OUTS = ["data/prepared", "data/model", "reports/train", "reports/traces", "reports/figures",
        "reports/metrics.json"]


def tree_hashes(root: Path, paths: list[str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for rel in paths:
        p = root / rel
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            key = str(f.relative_to(root))
            if f.exists() and not key.endswith(skip):
                out[key] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# Tiny model and data (conftest.TINY), long enough to kill mid-run, with masks, collapse and
# random regrowth (the schedule's own generator) so resume has all the state to restore.
PARAMS = {"train": {"steps": 120, "checkpoint_every": 20, "eval_every": 20, "log_every": 5},
          "surge": {"mode": "interval", "collapse_every": 15, "surge_every": 25,
                    "regrow": "random"}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A tiny project after one full `dvc repro`; its train run is the uninterrupted reference
    of the resume test."""
    repo = make_repo(tmp_path_factory.mktemp("hardening") / "repo", PARAMS)
    run(["dvc", "repro"], repo)
    return repo


def mlflow_client(repo: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def run_id_of(repo: Path) -> str:
    return yaml.safe_load((repo / "reports/train/run.json").read_text())["run_id"]


# ------------------------------------------------------------------ reproducibility
def test_repro_twice_gives_identical_metrics(pipeline):
    metrics = (pipeline / "reports/metrics.json").read_bytes()
    before = tree_hashes(pipeline, OUTS, skip=("run.json",))
    assert b"run_id" not in metrics  # differs per run by design; kept in reports/train/run.json
    run(["dvc", "repro", "-f"], pipeline)
    assert (pipeline / "reports/metrics.json").read_bytes() == metrics
    after = tree_hashes(pipeline, OUTS, skip=("run.json",))
    assert after == before  # weights, curves, traces, figures too (run.json aside)


# ------------------------------------------------------------------ validation + checkout
@pytest.mark.parametrize("section,bad,stage,message", [
    ("train", {"stepz": 10}, "train", "unknown key 'train.stepz' (did you mean 'train.steps'?)"),
    ("data", {"source": "text", "path": "corpus/missing.txt"}, "prepare",
     "'data.path' file not found: corpus/missing.txt"),
])
def test_bad_params_fail_repro_then_checkout_restores(pipeline, section, bad, stage, message):
    good = (pipeline / "params.yaml").read_text()
    before = tree_hashes(pipeline, OUTS)
    params = yaml.safe_load(good)
    params[section].update(bad)
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = run(["dvc", "repro"], pipeline, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert f"params.yaml: {message}" in out
        assert "exited with 2" in out
        assert "Traceback" not in out
        if stage == "train":  # DVC removed train's outputs before the stage failed
            assert not (pipeline / "data/model").exists()
        else:  # prepare's output is persisted (dvc.yaml): left as it was, nothing overwritten
            prepared = {k: v for k, v in before.items() if k.startswith("data/prepared/")}
            assert prepared and tree_hashes(pipeline, ["data/prepared"]) == prepared
    finally:
        (pipeline / "params.yaml").write_text(good)
    run(["dvc", "checkout"], pipeline)
    assert tree_hashes(pipeline, OUTS) == before
    assert "up to date" in run(["dvc", "status"], pipeline).stdout


# ------------------------------------------------------------------ resume after a kill
def copy_repo(src: Path, dest: Path, overrides: dict) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    params = merge(yaml.safe_load((src / "params.yaml").read_text()), overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for rel in ("data/model", "reports/train", "data/checkpoints"):  # as DVC would
        shutil.rmtree(dest / rel, ignore_errors=True)
    return dest


def env_for(repo: Path, **extra: str) -> dict:
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_train(repo: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "stages/train.py"], cwd=repo, env=env_for(repo),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_checkpoint(proc: subprocess.Popen, ckpt: Path, sig: int, timeout: float = 300):
    """Wait for a new checkpoint file, let a few more steps run, send `sig`; -> (rc, out)."""
    seen = ckpt.stat().st_mtime_ns if ckpt.exists() else None
    deadline = time.monotonic() + timeout
    while not (ckpt.exists() and ckpt.stat().st_mtime_ns != seen):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no new checkpoint before exit/timeout ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.005)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def metric_histories(client, run_id: str) -> dict[str, dict[int, list[float]]]:
    keys = client.get_run(run_id).data.metrics
    out: dict[str, dict[int, list[float]]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            out.setdefault(key, {}).setdefault(m.step, []).append(m.value)
    return out


def test_killed_train_resumes_bit_exact_into_the_same_run(pipeline, tmp_path):
    from lfmodel.checkpoint import load_state

    ref = pipeline  # trained uninterrupted by `dvc repro`, same params
    repo = copy_repo(pipeline, tmp_path / "killed", {})
    ckpt = repo / "data/checkpoints/last.safetensors"

    # 1) SIGTERM a few steps after the first checkpoint: run marked KILLED, checkpoint kept
    rc, out = kill_after_checkpoint(start_train(repo), ckpt, signal.SIGTERM)
    assert rc == 143, out
    assert "interrupted at step" in out and "Traceback" not in out
    run_id = run_id_of(repo)
    first = load_state(ckpt)
    assert first["run_id"] == run_id and 0 < first["trainer"]["step"] < 120
    client = mlflow_client(repo)
    assert client.get_run(run_id).info.status == "KILLED"

    # 2) resume, then SIGKILL after its next checkpoint (no cleanup at all; run left RUNNING)
    rc, out = kill_after_checkpoint(start_train(repo), ckpt, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out
    second = load_state(ckpt)
    assert second["run_id"] == run_id
    assert first["trainer"]["step"] < second["trainer"]["step"] < 120

    # 3) rerun through DVC (it deletes data/model and reports/train first): completes
    proc = run(["dvc", "repro", "train"], repo)
    assert f"resuming from step {second['trainer']['step']} (run {run_id})" in proc.stdout
    assert run_id_of(repo) == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not ckpt.exists()

    # weights, masks, curves, events and sparsity snapshots equal the uninterrupted run's
    outs = ["data/model", "reports/train"]
    got, want = tree_hashes(repo, outs, ("run.json",)), tree_hashes(ref, outs, ("run.json",))
    assert any("sparsity/step_" in k for k in want)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []

    # MLflow: the train metrics of the reference run (which also holds trace/evaluate's) at
    # every step, none missing; steps logged between a checkpoint and a kill (flushed on
    # SIGTERM) are logged again on resume, with the same values
    hist, ref_hist = metric_histories(client, run_id), metric_histories(
        mlflow_client(ref), run_id_of(ref))
    assert {"loss/train", "loss/val", "lr", "sparsity/all", "events/collapse",
            "events/surge", "final/val_loss"} <= hist.keys() <= ref_hist.keys()
    for key, steps in hist.items():
        assert {s: v[-1] for s, v in steps.items()} == {
            s: v[-1] for s, v in ref_hist[key].items()}, key
        assert all(len(set(v)) == 1 for v in steps.values()), key


# ------------------------------------------------------------------ resume, every mode, in-process
class _Kill:
    """Raise at the end of step `at` (after the checkpointer ran): an in-process 'kill'."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        if step == self.at:
            raise KeyboardInterrupt(f"killed at {step}")


SURGE = {"start_fraction": 0.3, "collapse_every": 10, "surge_every": 15, "regrow": "random",
         "rigl_every": 5, "check_every": 5, "energy_steps": 10, "noise_steps": 10,
         "high": 0.85, "low": 0.82, "plateau_window": 2, "plateau_eps": 0.01}


@pytest.mark.parametrize("mode", ["dense", "static", "interval", "rigl", "adaptive"])
def test_checkpoint_restore_is_bit_exact_in_every_mode(mode, tmp_path):
    import random

    import numpy as np
    import torch
    from conftest import TINY

    from lfmodel.checkpoint import Checkpointer
    from lfmodel.config import validate
    from lfmodel.curves import CurvesHook
    from lfmodel.data import prepare_regimes
    from lfmodel.models import build_model
    from lfmodel.sparsity import build_schedule
    from lfmodel.training import TrainConfig, Trainer, seed_everything

    params = validate(merge(TINY, {"train": {"steps": 50, "checkpoint_every": 10},
                                   "surge": {**SURGE, "mode": mode}}))
    splits, meta = prepare_regimes(params["data"], params["seed"])

    def make(kill_at: int | None = None):
        seed_everything(params["seed"], 1)
        model = build_model(params["model"], meta["vocab_size"])
        cfg = TrainConfig.from_params(params)
        hooks = [build_schedule(params["surge"], cfg.steps, params["seed"]), CurvesHook(),
                 Checkpointer(tmp_path / "ckpt", 10, "fp")]
        hooks += [_Kill(kill_at)] if kill_at else []
        return Trainer(model, splits["train"], splits["val"], cfg, hooks)

    ref = make().fit()
    ref_rng = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        make(kill_at=27).fit()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a new process's RNGs
    resumed = make()
    ckpt = resumed.hooks[2]
    state = ckpt.load()
    assert state is not None and state["trainer"]["step"] == 20
    ckpt.restore(resumed, state)
    resumed.fit()

    if mode != "dense":
        assert ref.events
    if mode in ("interval", "rigl", "adaptive"):  # events on both sides of the checkpoint
        assert any(e["step"] > 20 for e in ref.events)
    if mode == "adaptive":  # every rule fires, input noise (torch RNG) included
        from lfmodel.sparsity import RULES  # the sparsity floor included
        assert {e["rule"] for e in ref.events} == set(RULES)
    assert resumed.losses == ref.losses
    assert resumed.lrs == ref.lrs
    assert resumed.events == ref.events
    assert resumed.val_history == ref.val_history
    assert resumed.hooks[1].rows == ref.hooks[1].rows
    for (name, a), b in zip(ref.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    for name, m in ref.masks.masks.items():
        assert torch.equal(m, resumed.masks.masks[name]), name
    for a, b in zip(ref.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ref.generator.get_state(), resumed.generator.get_state())
    assert torch.equal(torch.get_rng_state(), ref_rng)


def test_resume_puts_back_only_its_own_runs_sparsity_snapshots(tmp_path):
    """A run of other params writes snapshots of the same names and sizes. They used to stay
    in the one mirror folder (copied only when the size differed) and come back on resume:
    a killed then resumed run held the other run's masks. And a run that starts fresh and is
    killed before its first checkpoint leaves the other run's checkpoint and snapshots
    resumable, so a return to those params still gets all of its snapshots back."""
    import hashlib

    import torch
    from conftest import TINY

    from lfmodel.checkpoint import Checkpointer
    from lfmodel.config import validate
    from lfmodel.data import prepare_regimes
    from lfmodel.models import build_model
    from lfmodel.sparsity import build_schedule
    from lfmodel.tracking import MLflowHook
    from lfmodel.training import TrainConfig, Trainer, seed_everything

    class NoTracker:
        def log_metrics(self, metrics: dict, step: int) -> None:
            pass

        def flush(self) -> None:
            pass

    def train(sparsity: float, out: str, kill_at: int | None = None) -> dict[str, str]:
        """As experiment.train does: fresh start clears the snapshots; -> their hashes."""
        params = validate(merge(TINY, {"train": {"steps": 40, "checkpoint_every": 20},
                                       "surge": {"mode": "interval", "collapse_every": 10,
                                                 "surge_every": 15,
                                                 "target_sparsity": sparsity}}))
        splits, meta = prepare_regimes(params["data"], params["seed"])
        snapshots = tmp_path / out / "sparsity"
        ckpt = Checkpointer(tmp_path / out / "ckpt", 20, f"sparsity {sparsity}", snapshots)
        state = ckpt.load()
        if state is None:
            shutil.rmtree(snapshots, ignore_errors=True)
        seed_everything(params["seed"], 1)
        cfg = TrainConfig.from_params(params)
        hooks = [build_schedule(params["surge"], cfg.steps, params["seed"]),
                 MLflowHook(NoTracker(), 10, tmp_path / out), ckpt]
        hooks += [_Kill(kill_at)] if kill_at else []
        trainer = Trainer(build_model(params["model"], meta["vocab_size"]), splits["train"],
                          splits["val"], cfg, hooks)
        if state is not None:
            ckpt.restore(trainer, state)
        try:
            trainer.fit()
            ckpt.clear()
        except KeyboardInterrupt:
            pass
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(snapshots.glob("*"))}

    torch.set_num_threads(1)
    want = {s: train(s, f"ref{s}") for s in (0.3, 0.7)}  # uninterrupted
    assert want[0.3].keys() == want[0.7].keys() and want[0.3] != want[0.7]

    train(0.3, "run", kill_at=27)   # checkpoint at 20, snapshots of steps 10, 15, 20 mirrored
    train(0.7, "run", kill_at=27)   # other params: fresh start, its own checkpoint at 20
    assert train(0.7, "run") == want[0.7]   # resumed from 20

    train(0.3, "back", kill_at=27)
    train(0.7, "back", kill_at=5)   # fresh start, killed before its first checkpoint
    assert train(0.3, "back") == want[0.3]  # resumes the 0.3 run, every snapshot back


# ------------------------------------------------------------------ divergence guard
def test_nan_loss_fails_run_and_keeps_last_good_checkpoint(pipeline, tmp_path):
    import torch

    from lfmodel.checkpoint import load_state

    repo = copy_repo(pipeline, tmp_path / "nan", {})
    proc = run([sys.executable, "stages/train.py"], repo, check=False,
               env={"LFMODEL_FAULT_NAN_AT_STEP": "25"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert err[-1].startswith("train: non-finite loss (nan) at step 25; training stopped")
    assert "last good checkpoint (step 20) kept in data/checkpoints/last.safetensors" in err[-1]
    assert not (repo / "data/model").exists()

    run_id = run_id_of(repo)
    run_info = mlflow_client(repo).get_run(run_id)
    assert run_info.info.status == "FAILED"
    assert run_info.data.metrics["diverged_at_step"] == 25
    assert run_info.data.tags["lfmodel.diverged_at_step"] == "25"
    assert "at step 25" in run_info.data.tags["dvc.stage.train.error"]

    state = load_state(repo / "data/checkpoints/last.safetensors")
    assert state["run_id"] == run_id and state["trainer"]["step"] == 20
    assert all(bool(torch.isfinite(t).all()) for t in state["trainer"]["model"].values())


# ------------------------------------------------------------------ checkpoint fingerprint
def test_fingerprint_follows_values_not_the_bytes_of_params_yaml(tmp_path, monkeypatch):
    """Editing a comment or the key order keeps a checkpoint resumable; an edited value that
    train reads, or other prepared data, discards it. (It used to hash params.yaml's bytes.)"""
    from lfmodel.checkpoint import Checkpointer, fingerprint, save_state
    from lfmodel.config import load_params

    monkeypatch.chdir(tmp_path)
    text = "# my run\ntrain:\n  steps: 40  # short\n  lr: 0.01\nseed: 3\n"
    variants = {
        "same": text,
        "comment": text.replace("# short", "# shorter, as agreed"),
        "order": "seed: 3\ntrain:\n  lr: 0.01\n  steps: 40\n",
        "value": text.replace("lr: 0.01", "lr: 0.02"),
        "data params only": text + "data:\n  n_train: 999\n",  # enter through the data hash
    }
    fps = {}
    for name, body in variants.items():
        Path("params.yaml").write_text(body)
        fps[name] = fingerprint(load_params("params.yaml"), "datahash")
    assert fps["comment"] == fps["same"] == fps["order"] == fps["data params only"]
    assert fps["value"] != fps["same"]
    assert fingerprint(load_params("params.yaml"), "otherdata") != fps["data params only"]

    save_state(tmp_path / "ckpt/last.safetensors", {"fingerprint": fps["same"], "run_id": "r",
                                                    "trainer": {"step": 20}})
    assert Checkpointer(tmp_path / "ckpt", 10, fps["comment"]).load()["trainer"]["step"] == 20
    assert Checkpointer(tmp_path / "ckpt", 10, fps["value"]).load() is None
