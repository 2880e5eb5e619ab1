"""Sparsity: masks (masks.py) at the bottom, the fixed schedules (schedules.py) and the
adaptive controller (controller.py) above them, and `build_schedule`, which picks one."""

from __future__ import annotations

import torch

from lfmodel.sparsity.controller import RULES, AdaptiveController
from lfmodel.sparsity.masks import MaskSet, kth_smallest, lowest_k
from lfmodel.sparsity.schedules import SCHEDULES, Schedule, TrainerLike, record

__all__ = ["RULES", "SCHEDULES", "AdaptiveController", "MaskSet", "Schedule", "TrainerLike",
           "build_schedule", "kth_smallest", "lowest_k", "record"]


def build_schedule(surge: dict, total_steps: int, seed: int) -> Schedule:
    """`surge` section of params.yaml -> schedule hook."""
    generator = torch.Generator().manual_seed(seed + 1)
    if surge["mode"] == "adaptive":
        return AdaptiveController(surge, total_steps, generator)
    return SCHEDULES[surge["mode"]](surge, total_steps, generator)
