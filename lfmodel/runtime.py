"""Where a run executes: the device (`train.device`) and the torch thread count (`train.threads`).

Threads. On a small model, torch's intra-op threads spin while they wait for work; two runs
with 2 threads each on 2 cores stall each other (measured: a 74 s train took over 8 minutes
beside another). `train.threads: 0` (the default) therefore picks the count when the run
starts: the usable cores divided by the number of trainings running on this machine (this one
included), at least 1. A training is a train stage, or a queued DVC experiment in flight (`dvc
exp exec-run`, one per busy queue worker) from its first stage to its last: the experiment
beside this one may be between its train and its evaluate, and its worker starts the next
experiment's train seconds later (counting train stages alone, one of four queued experiments
chose 2 threads that way and stalled beside another: bench/dvc_queue.py). A lone `dvc repro`
gets every core; two queued experiments (`dvc queue start -j 2`) get one core each. The count
is chosen once and never changes during a run, and the train stage records it (MLflow tag
`lfmodel.threads_used`): the same params on the same device and thread count give the same
numbers, so set `train.threads` explicitly to reproduce a run bit for bit on a busy machine.

Device. `auto` is cuda when torch sees a GPU, else cpu. On cuda, determinism needs cuBLAS's
fixed workspace (CUBLAS_WORKSPACE_CONFIG, set before CUDA starts) and
`torch.use_deterministic_algorithms`; `select_device` sets both. The random generators stay on
the CPU (batches, surge noise, sampling draw the same numbers on any device); what they draw
is moved to the device.
"""

from __future__ import annotations

import os

import psutil
import torch

from lfmodel.config import ParamsError, step_floats_per_token

TRAIN_MODULE = "stages.train"
QUEUED_RUN = ("exp", "exec-run")  # how a DVC queue worker runs one experiment: `dvc exp exec-run`


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a cgroup or taskset limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _runs(cmd: list[str], args: tuple[str, ...]) -> bool:
    return any(tuple(cmd[i:i + len(args)]) == args for i in range(len(cmd)))


def running_trainings() -> int:
    """Trainings on this machine, this process included: queued DVC experiments in flight (`dvc
    exp exec-run`, whatever stage they are in) plus train stages (python -m stages.train)
    outside them."""
    me = psutil.Process()
    queued, trains = set(), [me]
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
        except (psutil.Error, KeyError):
            continue
        if _runs(cmd, QUEUED_RUN):
            queued.add(proc.info["pid"])
        elif proc.info["pid"] != me.pid and _runs(cmd, ("-m", TRAIN_MODULE)):
            trains.append(proc)
    alone = 0
    for proc in trains:
        try:
            alone += not any(p.pid in queued for p in proc.parents())
        except psutil.Error:  # ended meanwhile
            continue
    return max(1, len(queued) + alone)


def choose_threads(requested: int) -> int:
    """`requested` if > 0; for 0, usable cores // running trainings (>= 1)."""
    if requested > 0:
        return requested
    return max(1, usable_cores() // running_trainings())


def set_threads(requested: int) -> int:
    """Fix torch's intra-op thread count for this run; returns the count used."""
    threads = choose_threads(requested)
    torch.set_num_threads(threads)
    return threads


def select_device(requested: str) -> torch.device:
    """`auto` | `cpu` | `cuda` -> a torch.device; on cuda, deterministic kernels are switched on."""
    name = "cuda" if requested == "auto" and torch.cuda.is_available() else requested
    if name == "auto":
        name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError("'train.device' is cuda but torch sees no CUDA GPU here "
                              f"(torch {torch.__version__}); use auto or cpu")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return torch.device(name)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a training step may use: the GPU's for cuda, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    return psutil.virtual_memory().available, "memory available"


def check_resources(params: dict) -> torch.device:
    """The run's device, after the checks that need torch or this machine (not in
    config.validate, so prepare and a sweep's driver need neither): `train.device` cuda without
    a GPU, and a batch whose activations cannot fit, which would otherwise die in the
    allocator with a traceback. Raises ParamsError."""
    device = select_device(params["train"]["device"])
    t = params["train"]
    per_seq = 4 * step_floats_per_token(params) * params["data"]["seq_len"]
    need = per_seq * t["batch_size"]
    have, what = available_bytes(device)
    if need > have:
        raise ParamsError(
            f"'train.batch_size' = {t['batch_size']} does not fit: one step needs at least "
            f"{need / 2**30:.3g} GiB of activations ({per_seq / 2**10:.0f} KiB per sequence of "
            f"data.seq_len {params['data']['seq_len']}), the limit is the {have / 2**30:.1f} GiB "
            f"of {what}; the largest batch that could fit is {have // per_seq}")
    return device
