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


def machine(torch_threads: bool = True) -> dict:
    """CPU model, cores, torch version (and intra-op threads), 1-minute load average."""
    import torch

    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch_threads:
        out["torch_threads"] = torch.get_num_threads()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out
