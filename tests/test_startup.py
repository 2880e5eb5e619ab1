"""Light stages (issue 12): each stage imports only what it uses, checked in a fresh
interpreter. torch (~1 s) and MLflow with its SQLite store (~2 s) are most of a stage's fixed
start-up cost (bench/startup.py): prepare needs neither, trace runs the model but logs
nothing, evaluate logs but reads files only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mlflow")
EXPECTED = {"prepare": set(), "train": {"torch", "mlflow"}, "trace": {"torch"},
            "evaluate": {"mlflow"}}


def imported_by(stage: str) -> set[str]:
    """Heavy modules in sys.modules after `import stages.<stage>` (MLflow comes later, when
    stage_run opens the run: train and evaluate)."""
    code = (f"import sys, json; import stages.{stage}; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("stage", ["prepare", "trace", "evaluate"])
def test_stage_imports_only_what_it_uses(stage):
    found = imported_by(stage)
    assert found <= EXPECTED[stage], f"stages.{stage} imports {sorted(found - EXPECTED[stage])}"
