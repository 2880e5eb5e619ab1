"""Data (issue 10): the exact Bayes filter against brute force, and bad data files a user really
has, each through the real `python -m stages.prepare` in a temp dir: one line naming the
problem, exit 2, no traceback, nothing written.

The files are made here, deterministically, in the shape of the real ones: a weekly CO2 record
(Mauna Loa style, 59 empty weeks), 309 yearly sunspot numbers, an empty text file, a constant
sensor column.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lfmodel.data import bayes_nll, make_regime_chains, read_column, switch_matrix

ROOT = Path(__file__).resolve().parents[1]
EMPTY_WEEKS = 59


# ------------------------------------------------------------------ bayes_nll is exact
def brute_force_nll(x: np.ndarray, chains: np.ndarray, p: float) -> np.ndarray:
    """-log p(x_t+1 | x_<=t) from p(x_0..x_t) summed over every regime path z_0..z_t.

    The generative model of sample_regimes: z_0 uniform, x_0 uniform (independent of z_0),
    z_t ~ A[z_t-1], x_t ~ T[z_t, x_t-1]. The x_0 factor cancels in the ratio.
    """
    k = chains.shape[0]
    a = switch_matrix(k, p)
    s1 = len(x)

    def prefix_prob(t: int) -> float:  # p(x_1..x_t | x_0)
        total = 0.0
        for z in itertools.product(range(k), repeat=t + 1):
            pr = 1.0 / k
            for i in range(1, t + 1):
                pr *= a[z[i - 1], z[i]] * chains[z[i], x[i - 1], x[i]]
            total += pr
        return total

    probs = [prefix_prob(t) for t in range(s1)]
    return np.array([-math.log(probs[t + 1] / probs[t]) for t in range(s1 - 1)])


def test_bayes_nll_equals_brute_force_over_all_regime_paths():
    """K=3, V=4, S=6: the forward filter equals the sum over all 3^7 regime paths."""
    rng = np.random.default_rng(7)
    k, v, s = 3, 4, 6
    chains = make_regime_chains(k, v, 0.5, rng)
    x = rng.integers(0, v, (5, s + 1))
    for p in (0.0, 0.2, 0.9):
        got = bayes_nll(x, chains, p)
        want = np.stack([brute_force_nll(row, chains, p) for row in x])
        assert got.shape == (5, s)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


# ------------------------------------------------------------------ bad data, the real stage
def co2_weekly(path: Path) -> Path:
    """A weekly CO2 record (ppm) with 59 empty weeks, in 4 runs and singles, one at the start."""
    n = 2600
    t = np.arange(n)
    rng = np.random.default_rng(1974)
    ppm = 330 + 0.035 * t + 3 * np.sin(2 * np.pi * t / 52.18) + rng.normal(0, 0.4, n)
    empty = set(range(0, 3)) | set(range(400, 420)) | set(range(1500, 1520)) | set(
        range(2000, 2010)) | {700, 901, 1203, 1808, 2222, 2590}
    assert len(empty) == EMPTY_WEEKS
    dates = np.datetime64("1974-05-19") + (7 * t).astype("timedelta64[D]")
    rows = [f"{d},{'' if i in empty else f'{v:.2f}'}" for i, (d, v) in enumerate(zip(
        dates.astype(str), ppm, strict=True))]
    path.write_text("date,ppm\n" + "\n".join(rows) + "\n")
    return path


def sunspots_yearly(path: Path) -> Path:
    """309 yearly sunspot numbers (1700-2008), an 11-year cycle."""
    years = np.arange(1700, 2009)
    spots = 80 * (1 + np.sin(2 * np.pi * (years - 1700) / 11.0)) + 5 * np.cos(years / 7.0)
    path.write_text("year,sunspots\n" + "".join(f"{y},{s:.1f}\n" for y, s in zip(
        years, spots, strict=True)))
    return path


def prepare_in(tmp: Path, data: dict, seq_len: int = 64) -> subprocess.CompletedProcess:
    """Run the real stage as DVC does, in tmp with a params.yaml that sets `data`."""
    (tmp / "params.yaml").write_text(yaml.safe_dump({"data": {"seq_len": seq_len, **data}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LFMODEL_PARAMS", None)
    return subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_rejected(proc: subprocess.CompletedProcess, tmp: Path, *parts: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("prepare: "), proc.stderr
    for part in parts:
        assert part in proc.stderr, f"{part!r} not in {proc.stderr!r}"
    assert not (tmp / "data").exists()


SERIES = {"source": "series", "path": "co2.csv", "column": "ppm"}


def test_missing_values_are_rejected_naming_the_option(tmp_path):
    co2_weekly(tmp_path / "co2.csv")
    proc = prepare_in(tmp_path, SERIES)
    assert_rejected(proc, tmp_path, "column 'ppm'", f"{EMPTY_WEEKS} missing values",
                    "data.missing", "drop", "interpolate")


@pytest.mark.parametrize("missing", ["drop", "interpolate"])
def test_missing_values_dropped_or_interpolated(missing, tmp_path):
    co2_weekly(tmp_path / "co2.csv")
    proc = prepare_in(tmp_path, {**SERIES, "missing": missing})
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    rows = 2600 - EMPTY_WEEKS if missing == "drop" else 2600
    n_test, n_val = int(rows * 0.1), int(rows * 0.1)
    want = [(rows - n_val - n_test - 1) // 64, (n_val - 1) // 64, (n_test - 1) // 64]
    assert list(meta["sizes"].values()) == want
    assert math.isfinite(meta["baseline_loss"]) and meta["baseline_loss"] > 0


def test_read_column_drop_and_interpolate_values(tmp_path):
    (tmp_path / "s.csv").write_text("t,v\n0,\n1,1\n2,2\n3,\n4,\n5,5\n6,\n")
    d = {"path": "s.csv", "column": "v"}
    assert read_column({**d, "missing": "drop"}, tmp_path).tolist() == [1, 2, 5]
    # linear in the row index; the ends take the nearest value
    assert read_column({**d, "missing": "interpolate"}, tmp_path).tolist() == [
        1, 1, 2, 3, 4, 5, 5]


def test_non_numeric_cell_is_an_error_whatever_data_missing(tmp_path):
    (tmp_path / "s.csv").write_text("v\n1\n2\nn/a?\n4\n")
    with pytest.raises(ValueError, match=r"1 non-numeric values \(first: 'n/a\?' in data row 3\)"):
        read_column({"path": "s.csv", "column": "v", "missing": "interpolate"}, tmp_path)


def test_too_short_series_says_the_largest_seq_len_that_fits(tmp_path):
    sunspots_yearly(tmp_path / "sunspots.csv")
    data = {"source": "series", "path": "sunspots.csv", "column": "sunspots"}
    proc = prepare_in(tmp_path, data)
    assert_rejected(proc, tmp_path, "a split of 30 items is shorter than seq_len + 1 = 65",
                    "309 items", "the largest data.seq_len that fits is 29")
    # and it does fit
    proc = prepare_in(tmp_path, data, seq_len=29)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data/prepared/meta.json").read_text())
    assert meta["sizes"] == {"train": 8, "val": 1, "test": 1}


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("empty.csv", "")])
def test_empty_file_says_it_is_empty(name, content, tmp_path):
    (tmp_path / name).write_text(content)
    data = ({"source": "text", "path": name} if name.endswith(".txt")
            else {"source": "series", "path": name, "column": "x"})
    assert_rejected(prepare_in(tmp_path, data), tmp_path, f"{name} is empty")


def test_constant_column_is_rejected_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    rows = "".join(f"{i},{rng.normal():.3f},21.5\n" for i in range(2000))
    (tmp_path / "sensor.csv").write_text("t,noise,setpoint\n" + rows)
    proc = prepare_in(tmp_path, {"source": "series", "path": "sensor.csv", "column": "setpoint"})
    assert_rejected(proc, tmp_path, "column 'setpoint' is constant", "21.5", "persistence")


def _series_csv(bad_row: int, bad: str) -> bytes:
    """300 rows of t,v; data row `bad_row` holds `bad` (in the test split for rows > 270)."""
    rows = [f"{i},{math.sin(i / 5):.3f}" for i in range(300)]
    rows[bad_row - 1] = f"{bad_row - 1},{bad}"
    return ("t,v\n" + "\n".join(rows) + "\n").encode()


@pytest.mark.parametrize("name,content,parts", [
    # before: exit 0, "persistence baseline nan", then train failed "non-finite loss"
    ("inf.csv", _series_csv(281, "inf"), ("column 'v' in inf.csv", "1 infinite values",
                                          "'inf' in data row 281")),
    ("huge.csv", _series_csv(290, "1e300"), ("column 'v' in huge.csv", "1e+300", "item 290",
                                             "float32")),
    # before: "'utf-8' codec can't decode byte 0xff ...", no file named
    ("latin1.txt", "caf\u00e9 ".encode("latin-1") * 200, ("latin1.txt is not UTF-8", "0xe9")),
    ("latin1.csv", _series_csv(3, "caf\u00e9").decode().encode("latin-1"),
     ("latin1.csv is not UTF-8", "0xe9")),
    # before: pandas' message, ending in a newline: two lines
    ("ragged.csv", _series_csv(5, "1.0,7"),
     ("ragged.csv is not a valid CSV", "Expected 2 fields in line 6, saw 3")),
])
def test_bad_file_is_one_line_naming_it(name, content, parts, tmp_path):
    (tmp_path / name).write_bytes(content)
    data = ({"source": "text", "path": name} if name.endswith(".txt")
            else {"source": "series", "path": name, "column": "v"})
    assert_rejected(prepare_in(tmp_path, data, seq_len=8), tmp_path, *parts)
