"""Device and thread choice (lfmodel.runtime) and the training state's device plumbing.

The thread rule is tested against real processes: dummy `python -m stages.train` processes
(a stages/train.py that only sleeps) and dummy `... exp exec-run ...` processes (a queued DVC
experiment in flight) are what running trainings look like to the rule.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from lfmodel import runtime
from lfmodel.config import ParamsError, validate
from lfmodel.data import prepare_regimes
from lfmodel.models import build_model
from lfmodel.sparsity import build_schedule
from lfmodel.training import TrainConfig, Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explicit_thread_count_is_kept():
    assert runtime.choose_threads(3) == 3
    assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1


def test_auto_threads_share_the_cores_among_running_trainings(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("import time\ntime.sleep(60)\n")
    before = runtime.running_trainings()
    procs = [subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tmp_path)
             for _ in range(3)]
    try:
        time.sleep(0.5)
        running = runtime.running_trainings()
        assert running == before + 3
        assert runtime.choose_threads(0) == max(1, runtime.usable_cores() // running)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert runtime.running_trainings() == before


def test_a_queued_experiment_counts_once_in_any_stage(tmp_path):
    """A DVC queue runs each experiment as `dvc exp exec-run`: one in flight is one training,
    with its train stage inside it or between stages (trace, evaluate, the next prepare)."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.py").write_text("import time\ntime.sleep(60)\n")
    spawn = ("import subprocess, sys, time\n"
             "if sys.argv[-1] == 'train':\n"
             "    subprocess.Popen([sys.executable, '-m', 'stages.train'])\n"
             "time.sleep(60)\n")
    before = runtime.running_trainings()
    procs = [subprocess.Popen([sys.executable, "-c", spawn, "exp", "exec-run", stage],
                              cwd=tmp_path, start_new_session=True)
             for stage in ("train", "evaluate")]
    procs.append(subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=tmp_path))
    try:
        deadline = time.monotonic() + 30  # until the first exec-run's train stage has started
        while not psutil.Process(procs[0].pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert runtime.running_trainings() == before + 3  # two experiments, one lone train
    finally:
        for p in procs[:2]:  # the exec-runs' process groups: their train stages too
            os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.kill()
            p.wait()
    time.sleep(0.2)
    assert runtime.running_trainings() == before


def test_device_auto_and_cuda_without_gpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.select_device("auto").type == want
    assert runtime.select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ParamsError, match=r"^'train.device' is cuda but torch sees no CUDA"):
            runtime.select_device("cuda")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_training_state_lives_on_the_device(device):
    """After steps with a collapse and a surge, every tensor of the training state (weights,
    grads, Adam moments, masks, data) is on the model's device, and masks survive a round trip
    through a CPU state dict (what a checkpoint stores)."""
    params = validate({"model": {"d_model": 16, "expert_dim": 16, "adapt_dim": 8, "adapt_rank": 2},
                       "train": {"steps": 12, "batch_size": 8, "log_every": 4, "eval_every": 6},
                       "surge": {"mode": "interval", "collapse_every": 4, "surge_every": 8}})
    splits, meta = prepare_regimes({**params["data"], "n_train": 64, "n_val": 16, "n_test": 16,
                                    "seq_len": 16}, seed=0)
    seed_everything(0, 1)
    dev = torch.device(device)
    model = build_model(params["model"], meta["vocab_size"]).to(dev)
    schedule = build_schedule(params["surge"], 12, 0)
    trainer = Trainer(model, splits["train"], splits["val"], TrainConfig.from_params(params),
                      [schedule])
    trainer.fit()
    assert trainer.masks.enabled
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
               *trainer.masks.masks.values(), trainer.train_x, trainer.val_x]
    tensors += [v for st in trainer.optimizer.state.values() for k, v in st.items()
                if k != "step" and isinstance(v, torch.Tensor)]
    assert {t.device.type for t in tensors} == {dev.type}
    state = {n: m.cpu() for n, m in trainer.masks.state_dict().items()}
    before = {n: m.clone().cpu() for n, m in trainer.masks.masks.items()}
    for m in trainer.masks.masks.values():
        m.fill_(True)
    trainer.masks.load_state_dict(state)
    for n, m in trainer.masks.masks.items():
        assert m.device.type == dev.type and torch.equal(m.cpu(), before[n])


@pytest.fixture
def deterministic_flag_restored():
    """select_device("cuda") switches deterministic algorithms on for the whole process."""
    saved = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(saved)


@pytest.mark.usefixtures("deterministic_flag_restored")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["dense", "static", "gradual", "interval", "rigl", "adaptive"])
def test_same_params_same_numbers_in_every_surge_mode(mode, device):
    """Two runs of the same params on the device give the same losses, events and masks. On
    cuda the run has deterministic algorithms on (runtime.select_device), so every op of a
    collapse, surge, rewire or controller decision must have a deterministic CUDA kernel:
    torch.kthvalue has none and raises there (the masks take the k-th value from a sort)."""
    def run() -> tuple:
        params = validate({
            "model": {"d_model": 16, "expert_dim": 16, "adapt_dim": 8, "adapt_rank": 2},
            "train": {"steps": 20, "batch_size": 8, "log_every": 4, "eval_every": 10},
            "surge": {"mode": mode, "collapse_every": 4, "surge_every": 8, "rigl_every": 4,
                      "check_every": 4, "gradual_every": 4}})
        splits, meta = prepare_regimes({**params["data"], "n_train": 64, "n_val": 16,
                                        "n_test": 16, "seq_len": 16}, seed=0)
        seed_everything(0, 1)
        dev = runtime.select_device(device)
        model = build_model(params["model"], meta["vocab_size"]).to(dev)
        trainer = Trainer(model, splits["train"], splits["val"], TrainConfig.from_params(params),
                          [build_schedule(params["surge"], 20, 0)])
        trainer.fit()
        return (trainer.losses, trainer.events,
                {n: m.cpu() for n, m in trainer.masks.masks.items()})

    (losses, events, masks), again = run(), run()
    assert (losses, events) == again[:2]
    assert masks.keys() == again[2].keys()
    assert all(torch.equal(m, again[2][n]) for n, m in masks.items())
    if mode != "dense":
        assert events and any(not m.all() for m in masks.values())
