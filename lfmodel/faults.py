"""Fault injection for tests: LFMODEL_FAULT_NAN_AT_STEP=N poisons the weights after step N-1,
so the loss of step N is NaN (exercises the divergence guard end to end; never set otherwise)."""

from __future__ import annotations

import os
from typing import Any

import torch

ENV_NAN_AT_STEP = "LFMODEL_FAULT_NAN_AT_STEP"


class NaNFault:
    """Fill the first weight tensor with NaN after step `at - 1` (after the checkpointer ran),
    so step `at` sees a non-finite loss."""

    def __init__(self, at: int) -> None:
        self.at = at

    def _poison(self, trainer: Any) -> None:
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(float("nan"))

    def on_train_start(self, trainer: Any) -> None:
        if trainer.step == self.at - 1:
            self._poison(trainer)

    def on_step_end(self, trainer: Any, step: int, metrics: dict) -> None:
        if step == self.at - 1:
            self._poison(trainer)


def fault_hooks() -> list[NaNFault]:
    """The hooks the environment asks for (none unless LFMODEL_FAULT_NAN_AT_STEP is set)."""
    at = os.environ.get(ENV_NAN_AT_STEP)
    return [NaNFault(int(at))] if at else []
