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


EXITING = """
import atexit, sys, threading, time
from pathlib import Path
from lfmodel.config import stage_main

out = Path(sys.argv[1])

class Teardown:  # a module global's finalizer runs in the interpreter's teardown only
    def __del__(self):
        (out / "teardown").write_text("ran")

KEEP = Teardown()

def late() -> None:
    time.sleep(0.3)
    (out / "thread").write_text("joined")

@stage_main
def main(params: dict) -> None:
    threading.Thread(target=late).start()  # non-daemon: the interpreter waits for it
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    sys.stdout.write("buffered, no newline")

main()
"""


def test_a_stage_exits_without_teardown_but_loses_nothing(tmp_path):
    """stage_main ends a stage with exit_fast: threads joined, atexit handlers run, streams
    flushed, exit code 0; only the interpreter's teardown (0.4-1.4 s of freeing modules) is
    skipped."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    proc = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()
