"""What every benchmark needs: the repository on sys.path and a record of the machine it ran
on (a ratio means little without the CPU, the torch build and how loaded the box was)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# torch's own kernels, MKL's and oneDNN's: each caps its instruction set by its own variable
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def caches() -> dict[str, str]:
    """Cache sizes of cpu0 by level ({"L2": "2048K", ...}; empty where sysfs does not say).
    A virtual machine's CPU name can be the same on different hosts ("Intel(R) Xeon(R)
    Processor"); the caches tell them apart (the same name came with a 260 MB and a 480 MB L3)."""
    out = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text()
            if kind.strip() != "Instruction":
                out[f"L{level}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return out


def machine(torch_threads: bool = True) -> dict:
    """CPU model, its caches, cores, torch version, the instruction set its kernels use (and
    intra-op threads), 1-minute load average. The instruction set moves the matmul rate 2x
    (AVX2 against AVX-512), so a share of it is only comparable on the same one; variables that
    cap it (`ISA_ENV`) are recorded where set."""
    import torch

    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    out = {"cpu": cpu, "caches": caches(), "cores": os.cpu_count(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    capped = {k: os.environ[k] for k in ISA_ENV if k in os.environ}
    if capped:
        out["isa_env"] = capped
    if torch_threads:
        out["torch_threads"] = torch.get_num_threads()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out
