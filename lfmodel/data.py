"""Datasets: regimes (a hidden Markov model with an exact Bayes loss), text and series.

numpy only (prepare needs no torch: it starts faster); the torch stages read the splits with
lfmodel.artifacts.load_split. Every split is saved as safetensors (no pickle) plus a
`meta.json`:
    inputs [N, S], targets [N, S]           long (tokens) or float32 (series)
    regimes [N, S]                          regimes only: the regime that emits each target
    bayes_nll [N, S]                        regimes only: -log p(target | prefix), exact filter
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import save_file

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- regimes (hidden Markov model)
def make_regime_chains(k: int, v: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """K random Markov chains: T[k, i, j] = p(x_t = j | x_t-1 = i, regime k), rows ~ Dir(alpha)."""
    t = rng.dirichlet(np.full(v, alpha), size=(k, v))
    t = np.maximum(t, 1e-12)  # Dirichlet(0.2) can underflow to exact 0s
    return t / t.sum(-1, keepdims=True)


def switch_matrix(k: int, p: float) -> np.ndarray:
    """A[i, j] = p(z_t = j | z_t-1 = i): stay with 1 - p, else one of the other K - 1 regimes."""
    if k == 1:
        return np.ones((1, 1))
    a = np.full((k, k), p / (k - 1))
    np.fill_diagonal(a, 1 - p)
    return a


def sample_regimes(n: int, s: int, chains: np.ndarray, p: float, rng: np.random.Generator):
    """n sequences of s + 1 tokens; z[:, t] is the regime that emitted x[:, t] (x_0 uniform)."""
    k, v, _ = chains.shape
    a = switch_matrix(k, p)
    x = np.empty((n, s + 1), dtype=np.int64)
    z = np.empty((n, s + 1), dtype=np.int64)
    z[:, 0] = rng.integers(0, k, n)
    x[:, 0] = rng.integers(0, v, n)
    cum_a = a.cumsum(-1)
    cum_t = chains.cumsum(-1)
    for t in range(1, s + 1):
        u = rng.random((n, 2))
        z[:, t] = np.minimum((u[:, :1] > cum_a[z[:, t - 1]]).sum(-1), k - 1)
        x[:, t] = np.minimum((u[:, 1:] > cum_t[z[:, t], x[:, t - 1]]).sum(-1), v - 1)
    return x, z


def bayes_nll(x: np.ndarray, chains: np.ndarray, p: float) -> np.ndarray:
    """Exact -log p(x_t+1 | x_<=t) by forward filtering over the regime; shape [n, s].

    The belief b_t(k) = p(z_t = k | x_<=t) starts uniform (x_0 carries no information), then
    predict: b' = b A; likelihood of x_t+1 under each regime: T[k, x_t, x_t+1]; update.
    """
    k = chains.shape[0]
    a = switch_matrix(k, p)
    n, s1 = x.shape
    belief = np.full((n, k), 1.0 / k)
    out = np.empty((n, s1 - 1))
    for t in range(s1 - 1):
        prior = belief @ a
        like = chains[:, x[:, t], x[:, t + 1]].T  # [n, k]
        joint = prior * like
        total = joint.sum(-1)
        out[:, t] = -np.log(total)
        belief = joint / total[:, None]
    return out


def oracle_nll(x: np.ndarray, z: np.ndarray, chains: np.ndarray) -> np.ndarray:
    """-log T[z_t+1, x_t, x_t+1]: the loss with the regime known (a lower, unreachable bound)."""
    return -np.log(chains[z[:, 1:], x[:, :-1], x[:, 1:]])


def prepare_regimes(d: dict, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    chains = make_regime_chains(d["num_regimes"], d["vocab_size"], d["dirichlet_alpha"], rng)
    splits, meta = {}, {"kind": "tokens", "vocab_size": d["vocab_size"], "source": "regimes"}
    for name, n in zip(SPLITS, (d["n_train"], d["n_val"], d["n_test"]), strict=True):
        x, z = sample_regimes(n, d["seq_len"], chains, d["switch_prob"], rng)
        nll = bayes_nll(x, chains, d["switch_prob"])
        splits[name] = {
            "inputs": x[:, :-1].copy(),
            "targets": x[:, 1:].copy(),
            "regimes": z[:, 1:].copy(),
            "bayes_nll": nll.astype(np.float32),
        }
        meta[f"bayes_loss_{name}"] = float(nll.mean())
        meta[f"oracle_loss_{name}"] = float(oracle_nll(x, z, chains).mean())
    splits["chains"] = {"transitions": chains.astype(np.float32)}
    return splits, meta


# ---------------------------------------------------------------- text and series
def _windows(arr: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of s + 1 items -> (inputs [n, s], targets [n, s])."""
    n = (len(arr) - 1) // s
    idx = np.arange(n)[:, None] * s + np.arange(s + 1)[None, :]
    w = arr[idx]
    return w[:, :-1], w[:, 1:]


def _split_bounds(n: int, d: dict) -> list[tuple[int, int]]:
    """[train, val, test) item ranges; raises if the shortest split holds no window of seq_len."""
    n_test = int(n * d["test_fraction"])
    n_val = int(n * d["val_fraction"])
    n_train = n - n_val - n_test
    bounds = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    shortest = min(hi - lo for lo, hi in bounds)
    if shortest < d["seq_len"] + 1:
        fits = (f"the largest data.seq_len that fits is {shortest - 1}" if shortest >= 3 else
                "no data.seq_len fits: use a longer file or larger val/test fractions")
        raise ValueError(f"a split of {shortest} items is shorter than seq_len + 1 = "
                         f"{d['seq_len'] + 1} ({n} items in {d['path']}); {fits}")
    return bounds


def _not_utf8(path: str, err: UnicodeDecodeError) -> ValueError:
    """The decoder's own message names neither the file nor what to do about it."""
    byte = err.object[err.start:err.start + 1].hex()
    return ValueError(f"{path} is not UTF-8 text (byte 0x{byte}: {err.reason}); save it as "
                      "UTF-8")


def prepare_text(d: dict, base: Path) -> tuple[dict, dict]:
    """Characters as tokens; vocabulary from the training split, id 0 = unknown character."""
    try:
        text = (base / d["path"]).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(d["path"], err) from None
    if not text:
        raise ValueError(f"{d['path']} is empty")
    bounds = _split_bounds(len(text), d)
    train_text = text[bounds[0][0]:bounds[0][1]]
    chars = sorted(set(train_text))
    stoi = {c: i + 1 for i, c in enumerate(chars)}
    ids = np.array([stoi.get(c, 0) for c in text], dtype=np.int64)
    splits = {}
    for name, (lo, hi) in zip(SPLITS, bounds, strict=True):
        x, y = _windows(ids[lo:hi], d["seq_len"])
        splits[name] = {"inputs": x.copy(), "targets": y.copy()}
    meta = {"kind": "tokens", "vocab_size": len(chars) + 1, "source": "text",
            "vocab": ["<unk>", *chars],
            "unknown_in_val_test": int((ids[bounds[0][1]:] == 0).sum())}
    return splits, meta


def read_column(d: dict, base: Path) -> np.ndarray:
    """`data.column` of the CSV as float64, empty cells handled by `data.missing`.

    error: reject them (the message names the option); drop: remove those rows (the series
    then jumps over the gap); interpolate: linear in the row index, the ends take the nearest
    value. Empty cells and nan/NA are missing; a cell that is present but not a number, or
    infinite (inf, 1e999), is always an error: z-scoring would turn the whole series to NaN.
    """
    path = base / d["path"]
    if path.stat().st_size == 0:
        raise ValueError(f"{d['path']} is empty")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{d['path']} is empty") from None
    except UnicodeDecodeError as err:
        raise _not_utf8(d["path"], err) from None
    except pd.errors.ParserError as err:  # pandas' message ends in a newline
        raise ValueError(f"{d['path']} is not a valid CSV: {' '.join(str(err).split())}") from None
    col = d["column"]
    if col not in df.columns:
        raise ValueError(f"column '{col}' not in {d['path']} (has: {', '.join(df.columns)})")
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce")
    for bad, what in ((values.isna() & raw.notna(), "non-numeric"),
                      (np.isinf(values), "infinite")):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"column '{col}' in {d['path']} has {int(bad.sum())} {what} values "
                             f"(first: '{raw.iloc[row]}' in data row {row + 1})")
    missing = int(values.isna().sum())
    if missing == len(values):
        raise ValueError(f"column '{col}' in {d['path']} has no values")
    if missing and d["missing"] == "error":
        raise ValueError(f"column '{col}' has {missing} missing values of {len(values)}; set "
                         "data.missing to drop or interpolate to use it anyway")
    if d["missing"] == "drop":
        values = values.dropna()
    elif d["missing"] == "interpolate":
        values = values.interpolate(method="linear", limit_direction="both")
    out = values.to_numpy(dtype=np.float64)
    if len(out) and out.min() == out.max():
        raise ValueError(f"column '{col}' is constant ({out[0]:g} in every row): nothing to "
                         "predict (the persistence baseline would be exactly 0)")
    return out


def prepare_series(d: dict, base: Path) -> tuple[dict, dict]:
    """One numeric CSV column, z-scored with training statistics; next-value regression."""
    values = read_column(d, base)
    bounds = _split_bounds(len(values), d)
    train = values[bounds[0][0]:bounds[0][1]]
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, named in one line
        mean, std = float(train.mean()), float(train.std())
        if std == 0:
            raise ValueError(f"column '{d['column']}' is constant over the training split (the "
                             f"first {bounds[0][1]} rows): nothing to learn from")
        z = ((values - mean) / std).astype(np.float32)
    out = np.flatnonzero(~np.isfinite(z))
    if len(out):  # finite values, but the statistics or a float32 z overflow: NaN losses
        raise ValueError(f"column '{d['column']}' in {d['path']}: {values[out[0]]:g} (item "
                         f"{out[0] + 1} of the series) does not fit in float32 once z-scored "
                         f"(training mean {mean:g}, std {std:g}); rescale the column")
    splits = {}
    for name, (lo, hi) in zip(SPLITS, bounds, strict=True):
        x, y = _windows(z[lo:hi], d["seq_len"])
        splits[name] = {"inputs": x.copy(), "targets": y.copy()}
    meta = {"kind": "series", "vocab_size": None, "source": "series", "mean": mean, "std": std}
    return splits, meta


# ---------------------------------------------------------------- baselines
def bigram_loss(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, y: np.ndarray,
                v: int, alphas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
                val: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Cross-entropy (nats) of an add-alpha bigram model fit on train (alpha picked on val)."""
    counts = np.zeros((v, v))
    np.add.at(counts, (np.ravel(train_x), np.ravel(train_y)), 1.0)

    def nll(alpha: float, xx: np.ndarray, yy: np.ndarray) -> float:
        p = (counts + alpha) / (counts + alpha).sum(-1, keepdims=True)
        return float(-np.log(p[np.ravel(xx), np.ravel(yy)]).mean())

    best = min(alphas, key=lambda a: nll(a, *(val if val is not None else (x, y))))
    return nll(best, x, y)


def unigram_loss(train_y: np.ndarray, y: np.ndarray, v: int) -> float:
    counts = np.bincount(np.ravel(train_y), minlength=v) + 0.5
    p = counts / counts.sum()
    return float(-np.log(p[np.ravel(y)]).mean())


def persistence_mse(x: np.ndarray, y: np.ndarray) -> float:
    """The trivial series baseline: predict that the next value equals the last one."""
    return float(((x - y) ** 2).mean())


# ---------------------------------------------------------------- entry points
def build(data_params: dict, seed: int, base: str | Path = ".") -> tuple[dict, dict]:
    """The splits of `data_params['source']` and their meta (baselines included), in memory.

    Raises ValueError with one line on a bad data file, before anything is written.
    """
    src = data_params["source"]
    if src == "regimes":
        splits, meta = prepare_regimes(data_params, seed)
    elif src == "text":
        splits, meta = prepare_text(data_params, Path(base))
    else:
        splits, meta = prepare_series(data_params, Path(base))
    tr, va, te = (splits[s] for s in SPLITS)
    if meta["kind"] == "tokens":
        v = meta["vocab_size"]
        meta["baseline_loss"] = bigram_loss(tr["inputs"], tr["targets"], te["inputs"],
                                            te["targets"], v, val=(va["inputs"], va["targets"]))
        meta["baseline"] = "bigram"
        meta["unigram_loss"] = unigram_loss(tr["targets"], te["targets"], v)
        meta["log_vocab"] = math.log(v)
    else:
        meta["baseline_loss"] = persistence_mse(te["inputs"], te["targets"])
        meta["baseline"] = "persistence"
    meta["seq_len"] = data_params["seq_len"]
    meta["sizes"] = {s: int(splits[s]["inputs"].shape[0]) for s in SPLITS}
    return splits, meta


def write(splits: dict, meta: dict, out_dir: str | Path) -> None:
    """Save every split as safetensors and meta.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, tensors in splits.items():
        save_file({k: np.ascontiguousarray(t) for k, t in tensors.items()},
                  str(out / f"{name}.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def prepare(data_params: dict, seed: int, out_dir: str | Path, base: str | Path = ".") -> dict:
    """Build the splits and write them to out_dir; returns meta."""
    splits, meta = build(data_params, seed, base)
    write(splits, meta, out_dir)
    return meta


def load_meta(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "meta.json").read_text())
