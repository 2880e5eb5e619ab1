"""Params: defaults, loading and validation.

`params.yaml` is the only config and `DEFAULTS` below the only place a default is written
(params.yaml repeats it, a test checks they are equal). Every stage calls `load_params()`
before it writes anything; a bad key, type or value raises `ParamsError` with one line naming
the key, which the stage entry point turns into exit code 2 (see `stage_main`). The checks
that need torch or this machine (a cuda device, the batch's memory) are
`runtime.check_resources`, which train runs before it writes anything: prepare and a sweep's
driver stay free of torch.

The stages read `params.yaml` in the working directory, or the file named by the environment
variable `LFMODEL_PARAMS` (used by tests and to run a stage by hand against another params
file; refused when DVC runs the stage). A relative `data.path` is relative to the folder of
that params file, both when it is validated and when `prepare` reads it (`data_file`).
"""

from __future__ import annotations

import atexit
import difflib
import functools
import math
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import yaml

SURGE_MODES = ("dense", "static", "interval", "rigl", "adaptive", "gradual")
DATA_SOURCES = ("regimes", "text", "series")
ARCHS = ("lfm", "mlp")

# The schema: the default value fixes the type; CHOICES and RANGES narrow it.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "lambda_entropy": 0.01,
    "data": {
        "source": "regimes", "path": None, "column": None, "seq_len": 64,
        "n_train": 16384, "n_val": 256, "n_test": 512, "vocab_size": 32, "num_regimes": 4,
        "switch_prob": 1 / 32, "dirichlet_alpha": 0.2, "val_fraction": 0.1,
        "test_fraction": 0.1, "missing": "error",
    },
    "model": {
        "arch": "lfm", "d_model": 64, "num_layers": 2, "num_experts": 4, "expert_dim": 64,
        "adapt_dim": 16, "adapt_rank": 4, "context": 8, "hidden": 256,
    },
    "train": {
        "steps": 1100, "batch_size": 32, "lr": 0.015, "weight_decay": 0.0, "cosine": True,
        "warmup_steps": 50, "grad_clip": 1.0, "lambda_balance": 0.0, "eval_every": 100,
        "log_every": 25, "checkpoint_every": 200, "threads": 0, "device": "auto",
    },
    "surge": {
        "mode": "dense", "target_sparsity": 0.5, "scope": "layer", "start_fraction": 0.3,
        "collapse_every": 100, "surge_every": 200, "regrow": "random", "recovery": 0.1,
        "noise_scale": 0.5, "rigl_every": 50, "drop_fraction": 0.3, "rigl_end_fraction": 0.75,
        "gradual_start_fraction": 0.1, "gradual_end_fraction": 0.6, "gradual_every": 25,
        "check_every": 50, "ema": 0.7, "high": 0.85, "low": 0.45, "step_sparsity": 0.1,
        "max_sparsity": 0.5, "energy_boost": 2.0, "energy_steps": 50, "pump_fraction": 0.1,
        "input_noise": 0.1, "noise_steps": 50, "plateau_window": 3, "plateau_eps": 0.005,
        "floor_end_fraction": 0.75,
    },
    "tracking": {"experiment": "entropy-dynamics", "snapshot_every": 100},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": DATA_SOURCES, "model.arch": ARCHS, "surge.mode": SURGE_MODES,
    "surge.scope": ("layer", "global"), "surge.regrow": ("random", "gradient", "all"),
    "data.missing": ("error", "drop", "interpolate"), "train.device": ("auto", "cpu", "cuda"),
}
# (low, high, low_inclusive, high_inclusive); None = unbounded.
_POS = (0, None, False, True)
_NONNEG = (0, None, True, True)
_UNIT_OPEN = (0, 1, True, False)
_UNIT = (0, 1, True, True)
# np.random.seed takes [0, 2**32 - 1]; the one derived seed (sparsity.build_schedule's
# seed + 1) goes to torch, which takes up to 2**64 - 1, so this bound covers it too.
SEED_MAX = 2**32 - 1
RANGES: dict[str, tuple] = {
    "seed": (0, SEED_MAX, True, True),
    "data.seq_len": (2, None, True, True), "data.n_train": _POS, "data.n_val": _POS,
    "data.n_test": _POS, "data.vocab_size": (2, None, True, True),
    "data.num_regimes": (1, None, True, True), "data.switch_prob": _UNIT,
    "data.dirichlet_alpha": _POS, "data.val_fraction": (0, 0.5, False, False),
    "data.test_fraction": (0, 0.5, False, False),
    "model.d_model": _POS, "model.num_layers": _POS, "model.num_experts": _POS,
    "model.expert_dim": _POS, "model.adapt_dim": _POS, "model.adapt_rank": _NONNEG,
    "model.context": _POS, "model.hidden": _POS,
    "train.steps": _POS, "train.batch_size": _POS, "train.lr": _POS,
    "train.weight_decay": _NONNEG, "train.warmup_steps": _NONNEG, "train.grad_clip": _NONNEG,
    "train.lambda_balance": _NONNEG, "train.eval_every": _POS, "train.log_every": _POS,
    "train.checkpoint_every": _POS, "train.threads": _NONNEG,
    "surge.target_sparsity": _UNIT_OPEN, "surge.start_fraction": _UNIT,
    "surge.collapse_every": _POS, "surge.surge_every": _POS, "surge.recovery": _UNIT,
    "surge.noise_scale": _NONNEG, "surge.rigl_every": _POS, "surge.drop_fraction": _UNIT,
    "surge.rigl_end_fraction": _UNIT, "surge.gradual_start_fraction": _UNIT,
    "surge.gradual_end_fraction": _UNIT, "surge.gradual_every": _POS,
    "surge.check_every": _POS, "surge.ema": _UNIT_OPEN,
    "surge.high": _UNIT, "surge.low": _UNIT, "surge.step_sparsity": _UNIT_OPEN,
    "surge.max_sparsity": _UNIT_OPEN, "surge.energy_boost": _POS, "surge.energy_steps": _NONNEG,
    "surge.pump_fraction": _UNIT, "surge.input_noise": _NONNEG, "surge.noise_steps": _NONNEG,
    "surge.plateau_window": _POS, "surge.plateau_eps": _NONNEG,
    "surge.floor_end_fraction": _UNIT,
    "tracking.snapshot_every": _POS,
}
NULLABLE = {"data.path", "data.column"}


class ParamsError(ValueError):
    """A bad params.yaml: the message names the key."""


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if default is None:
        return value is None or isinstance(value, str)
    return isinstance(value, type(default))


def _type_name(default: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), "a string or null")


def _all_keys(schema: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in schema.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_all_keys(v, f"{prefix}{k}."))
    return out


def _did_you_mean(key: str, prefix: str, schema: dict) -> str:
    """A close key in the same section, else the same (or a close) key in another section."""
    near = difflib.get_close_matches(key, list(schema), n=1)
    if near:
        return f" (did you mean '{prefix}{near[0]}'?)"
    elsewhere = [k for k in _all_keys(DEFAULTS) if k.rsplit(".", 1)[-1] == key]
    if not elsewhere:
        leaves = {k.rsplit(".", 1)[-1]: k for k in _all_keys(DEFAULTS)}
        elsewhere = [leaves[n] for n in difflib.get_close_matches(key, list(leaves), n=1)]
    return f" (did you mean '{elsewhere[0]}'?)" if elsewhere else ""


def _check(user: dict, schema: dict, prefix: str = "") -> dict:
    if not isinstance(user, dict):
        where = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ParamsError(f"{where} must be a mapping of keys, got {user!r}"[:200])
    out: dict[str, Any] = {}
    for key, value in user.items():
        full = prefix + str(key)
        if key not in schema:
            raise ParamsError(f"unknown key '{full}'{_did_you_mean(str(key), prefix, schema)}")
        default = schema[key]
        if isinstance(default, dict):
            out[key] = _check({} if value is None else value, default, full + ".")
            continue
        if value is None and full in NULLABLE:
            out[key] = None
            continue
        if not _type_ok(value, default):
            hint = (" (YAML reads unquoted off/on/no/yes as booleans: quote the value)"
                    if isinstance(value, bool) and isinstance(default, str) else "")
            expected = (f"one of {', '.join(CHOICES[full])}" if full in CHOICES
                        else _type_name(default))
            raise ParamsError(f"'{full}' must be {expected}, got {value!r}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamsError(f"'{full}' must be a finite number, got {value!r}")
        if full in CHOICES and value not in CHOICES[full]:
            raise ParamsError(f"'{full}' must be one of {', '.join(CHOICES[full])}; got {value!r}")
        if full in RANGES:
            lo, hi, lo_inc, hi_inc = RANGES[full]
            bad = (lo is not None and (value < lo or (value == lo and not lo_inc))) or (
                hi is not None and (value > hi or (value == hi and not hi_inc)))
            if bad:
                interval = ("[" if lo_inc else "(") + f"{lo}, {'inf' if hi is None else hi}" + (
                    "]" if hi_inc else ")")
                raise ParamsError(f"'{full}' = {value!r} is out of range {interval}")
        out[key] = float(value) if isinstance(default, float) else value
    merged = {}
    for key, default in schema.items():
        if key in out:
            merged[key] = out[key]
        elif isinstance(default, dict):
            merged[key] = _check({}, default, prefix + key + ".")
        else:
            merged[key] = default
    return merged


def step_floats_per_token(params: dict) -> int:
    """A lower bound on the float32 activations one training step keeps per token (saved for
    backward): the tensors each layer must hold, none of the temporaries. Measured on the
    default lfm / mlp (ru_maxrss of one forward + backward at batch 1024, seq_len 64): about
    19 KB and 4.8 KB per token, against 16 KB and 3.3 KB from this formula."""
    m, d = params["model"], params["data"]
    v = {"regimes": d["vocab_size"], "series": 1}.get(d["source"], 2)  # text: >= 2 characters
    if m["arch"] == "mlp":
        return m["context"] * v + 2 * m["hidden"] + 2 * v
    dm, e = m["d_model"], m["num_experts"]
    block = 14 * dm + e * (2 * m["expert_dim"] + 2 * dm) + m["adapt_dim"]
    return m["num_layers"] * block + 2 * dm + 2 * v


def data_file(params: dict, base_dir: str | os.PathLike = ".") -> Path:
    """The data file of text/series: `data.path`, relative to base_dir (the params file's folder)."""
    return Path(base_dir) / params["data"]["path"]


def validate(raw: dict | None, base_dir: str | os.PathLike = ".") -> dict:
    """Return the full params (defaults filled in) or raise ParamsError.

    base_dir is the folder of the params file: a relative `data.path` is checked there (and
    `prepare` reads it there, see `data_file`).
    """
    params = _check(raw or {}, DEFAULTS)
    if not params["tracking"]["experiment"].strip():  # else MLflow refuses it in train
        raise ParamsError("'tracking.experiment' must be a non-empty name, got "
                          f"{params['tracking']['experiment']!r}")
    data = params["data"]
    if data["source"] in ("text", "series"):
        if not data["path"]:
            raise ParamsError(f"'data.path' is required when data.source is {data['source']}")
        path = data_file(params, base_dir)
        if not path.is_file():
            raise ParamsError(f"'data.path' file not found: {data['path']}")
    if data["source"] == "series" and not data["column"]:
        raise ParamsError("'data.column' is required when data.source is series")
    surge = params["surge"]
    if surge["low"] >= surge["high"]:
        raise ParamsError(f"'surge.low' ({surge['low']}) must be below 'surge.high' ({surge['high']})")
    if (surge["mode"] == "adaptive" and surge["floor_end_fraction"] > 0
            and surge["max_sparsity"] < surge["target_sparsity"]):
        raise ParamsError(f"'surge.max_sparsity' ({surge['max_sparsity']}) must be at least "
                          f"'surge.target_sparsity' ({surge['target_sparsity']}) when the adaptive "
                          "floor is on (surge.floor_end_fraction > 0)")
    if surge["mode"] == "rigl" and surge["start_fraction"] >= surge["rigl_end_fraction"]:
        raise ParamsError(f"'surge.start_fraction' ({surge['start_fraction']}) must be below "
                          f"'surge.rigl_end_fraction' ({surge['rigl_end_fraction']}) when "
                          "surge.mode is rigl (else it never rewires)")
    if surge["mode"] == "gradual" and surge["gradual_start_fraction"] >= surge["gradual_end_fraction"]:
        raise ParamsError(f"'surge.gradual_start_fraction' ({surge['gradual_start_fraction']}) must "
                          f"be below 'surge.gradual_end_fraction' ({surge['gradual_end_fraction']}) "
                          "when surge.mode is gradual (else there is no ramp)")
    if data["val_fraction"] + data["test_fraction"] >= 0.9:
        raise ParamsError("'data.val_fraction' + 'data.test_fraction' must leave training data")
    return params


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `5e-05` and `1.0e5` (no dot, or no exponent sign) are
    strings; DVC writes floats below 1e-4 that way (`-S train.lr=5e-05`). This loader reads
    them as floats, as YAML 1.2 does; everything else is safe_load's."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """yaml.safe_load with YAML 1.2's exponent floats (_Loader): every params read uses it."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message on one line: the problem and where (its own spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    """Read and validate params.yaml; relative data paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
    return validate(raw, base_dir=path.parent)


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'surge': {'mode': 'x'}} -> {'surge.mode': 'x'} (MLflow params, DVC -S names)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_file() -> Path:
    """The params file the stages read: $LFMODEL_PARAMS if set, else ./params.yaml. Under DVC
    (it sets DVC_STAGE) another file is refused: DVC records ./params.yaml, so the run would
    not be the one its record shows."""
    other = os.environ.get("LFMODEL_PARAMS")
    if other and os.environ.get("DVC_STAGE"):
        raise ParamsError(f"LFMODEL_PARAMS={other} is set, but DVC runs this stage and records "
                          "./params.yaml: unset LFMODEL_PARAMS (change params with -S)")
    return Path(other or "params.yaml")


def exit_fast(code: int = 0) -> NoReturn:
    """End the process as the interpreter would (non-daemon threads joined, atexit handlers run,
    standard streams flushed), minus its teardown: freeing torch's and MLflow's module graphs
    took 0.4-1.4 s per stage process, a third of a logging stage's fixed cost (bench/startup.py).
    Everything a stage writes is closed by then; nothing of the teardown is output."""
    threading._shutdown()  # what Py_FinalizeEx does first: join threads, run their exit hooks
    atexit._run_exitfuncs()  # MLflow's, logging's, weakref.finalize's
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def stage_main(fn: Callable[[dict], None]) -> Callable[[], None]:
    """Wrap a stage's main: load + validate params first; ParamsError -> one line, exit 2.
    A stage that returns ends through exit_fast (stages run only as `python -m stages.X`)."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn(load_params(params_file()))
        except ParamsError as err:  # also one a stage finds later (runtime.check_resources)
            print(f"params.yaml: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        exit_fast(0)

    return wrapper
