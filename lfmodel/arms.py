"""The study's design as data (issue 13): arms, grids, their cost, and trimming to a budget.

An arm is a name and the `-S` overrides (dotted keys, as `dvc exp run -S` takes them) that make
it from params.yaml. `s` is the arm's target sparsity; budgets are multiples of UNIT_STEPS; every
point also sets `train.steps` and `seed`.

| arm           | overrides                                                                   |
|---------------|-----------------------------------------------------------------------------|
| dense         | surge.mode=dense                                                            |
| small_dense   | surge.mode=dense, model.d_model=d, model.expert_dim=e (see small_dense_dims) |
| static        | surge.mode=static, surge.target_sparsity=s (one collapse at start_fraction) |
| gradual       | surge.mode=gradual, surge.target_sparsity=s, surge.gradual_start_fraction,  |
|               | surge.gradual_end_fraction, surge.gradual_every (Zhu & Gupta cubic ramp)    |
| interval      | surge.mode=interval, surge.target_sparsity=s (regrow random, recovery 0.1)  |
| rigl          | surge.mode=rigl, surge.target_sparsity=s                                    |
| adaptive      | surge.mode=adaptive, surge.target_sparsity=s, surge.max_sparsity=s          |
|               | (the floor on: every layer at s by floor_end_fraction, never above s)        |
| adaptive_bare | surge.mode=adaptive, surge.floor_end_fraction=0, surge.max_sparsity=0.9     |
|               | (the controller alone; the cap is the design's largest sparsity so it is     |
|               | not what decides; no target: compared with static at what it reached)       |
| seed_dsd      | surge.mode=interval, surge.regrow=all, surge.target_sparsity=s: the seed's   |
|               | schedule as written (collapse every 100 steps, revive all every 200): DSD,   |
|               | it ends dense or at s, whichever event came last; the report reads which     |
|               | from the measured final sparsity                                             |
| static_matched| static at the sparsity adaptive_bare reached (a follow-up grid, see          |
|               | matched_static)                                                              |

`gradual` spells out its ramp (config.DEFAULTS: from 10 % to 60 % of the steps, a pruning step
every 25; schedules.Gradual) in its overrides, so each run names it. Step-counted schedule keys
(collapse_every, surge_every, rigl_every, check_every, gradual_every) are not scaled with the
budget: a 4x run fires them 4x as often, which is the schedule as written; fractions scale by
themselves.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lfmodel.config import DEFAULTS
from lfmodel.models import build_model, prunable, weight

SPARSITIES = (0.5, 0.8, 0.9)
BUDGETS = (1, 4)
# budget 1x: the default train.steps when the study was designed. Fixed here, so that tuning the
# default (1,100 steps since issue 12) does not change what a budget means or the known optimum
UNIT_STEPS = 1000
BUDGET_SPARSITY = 0.8  # where the 4x budget is run for the sparse arms
FULL_SEEDS = tuple(range(8))  # >= 5; stats.py: 8 seeds is what a claim needs after Holm
MIN_SEEDS = 3  # stats.MIN_PAIRS: fewer pairs give no interval
SPARSE_ARMS = ("static", "gradual", "interval", "rigl", "adaptive", "seed_dsd")
BASELINES = ("static", "gradual", "rigl", "small_dense")  # the literature's, compared against
SURGE_ARMS = ("interval", "adaptive", "seed_dsd")  # the surge-collapse arms
BEST_BASELINES = ("gradual", "rigl")  # the two best sparse baselines: a guess until measured
LAMBDAS = (-0.05, 0.0, 0.01, 0.05)
# Balance "on": the usage-entropy term train.lambda_balance * (log E - usage_entropy), at twice
# the largest |lambda_entropy| so it can outweigh the pull toward one expert.
BALANCE_ON = 0.1
BARE_MAX_SPARSITY = max(SPARSITIES)
GRADUAL = {f"surge.{k}": DEFAULTS["surge"][k]
           for k in ("gradual_start_fraction", "gradual_end_fraction", "gradual_every")}
# CPU-seconds per run outside the training steps (dvc, the 4 stage start-ups, prepare, trace,
# evaluate, MLflow). Measured on the 2-core machine (before the light stages of cc5f3cd, which
# cut the start-ups): process CPU (getrusage of the children) of `dvc exp run -S
# train.steps=21 -S train.threads=1 -S train.eval_every=10` on a default-params copy of the
# project, 26.2 s (26.4 s at 20 steps with prepare not cached: prepare is ~1 s), minus
# 21 x study.calibrate(32) = 21 x 46.5 ms: 25.2 s. A queued run adds the queue worker's share.
RUN_OVERHEAD_S = 25.0
# What runs alone, all cores idle (wall seconds). The default study of 2026-11-24 (130 + 5 runs,
# reports/study/cost.json): its first run started 153 s after `make study` did (calibration,
# then `dvc exp run --queue` once per point), phase 2 started 28 s after phase 1 ended, the
# report took 17 s: about 1 s of queueing per run plus ~30 s. Its runs (84.1 min for phase 1,
# with ~2.4 min of other jobs beside it) matched steps x 37.5 ms + RUN_OVERHEAD_S per run.
# Queueing has since moved into one process (sweep.queue, DVC's API): 130 study-like points
# queued in 15.4 s on the same machine, 0.12 s each; QUEUE_S keeps a margin.
QUEUE_S = 0.15
STUDY_FIXED_S = 30.0


def arm_overrides(arm: str, sparsity: float | None = None) -> dict[str, Any]:
    """The `-S` overrides of one arm (the table in the module docstring)."""
    s = sparsity
    needs_s = arm not in ("dense", "adaptive_bare")
    if needs_s and s is None:
        raise ValueError(f"arm {arm!r} needs a sparsity")
    if not needs_s and s is not None:
        raise ValueError(f"arm {arm!r} takes no sparsity, got {s}")
    table: dict[str, Callable[[], dict[str, Any]]] = {
        "dense": lambda: {"surge.mode": "dense"},
        "small_dense": lambda: {"surge.mode": "dense", **small_dense_dims(s).overrides},
        "static": lambda: {"surge.mode": "static", "surge.target_sparsity": s},
        "static_matched": lambda: {"surge.mode": "static", "surge.target_sparsity": s},
        "gradual": lambda: {"surge.mode": "gradual", "surge.target_sparsity": s, **GRADUAL},
        "interval": lambda: {"surge.mode": "interval", "surge.target_sparsity": s},
        "rigl": lambda: {"surge.mode": "rigl", "surge.target_sparsity": s},
        "adaptive": lambda: {"surge.mode": "adaptive", "surge.target_sparsity": s,
                             "surge.max_sparsity": s},
        "adaptive_bare": lambda: {"surge.mode": "adaptive", "surge.floor_end_fraction": 0.0,
                                  "surge.max_sparsity": BARE_MAX_SPARSITY},
        "seed_dsd": lambda: {"surge.mode": "interval", "surge.regrow": "all",
                             "surge.target_sparsity": s},
    }
    if arm not in table:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(table)}")
    return table[arm]()


# ---------------------------------------------------------------------------- small dense

@functools.lru_cache(maxsize=4096)
def _count(model_items: tuple, vocab_size: int) -> int:
    model = build_model(dict(model_items), vocab_size)
    return sum(weight(s).numel() for g in prunable(model).values() for s in g.values())


def prunable_count(model_params: dict, vocab_size: int) -> int:
    """Number of prunable weights (the 2-D weights sparsity applies to) of a built model."""
    return _count(tuple(sorted(model_params.items())), vocab_size)


@dataclass(frozen=True)
class SmallDense:
    d_model: int
    expert_dim: int
    count: int   # its prunable weights
    target: float  # (1 - s) x the dense model's count
    ratio: float  # count / dense count: compare with 1 - s

    @property
    def overrides(self) -> dict[str, int]:
        return {"model.d_model": self.d_model, "model.expert_dim": self.expert_dim}


def _closest(f: Callable[[int], int], hi: int, target: float) -> int:
    """The x in 1..hi whose f(x) is closest to target, f increasing (bisection)."""
    lo, up = 1, hi
    while lo < up:  # smallest x with f(x) >= target (hi if none)
        mid = (lo + up) // 2
        if f(mid) >= target:
            up = mid
        else:
            lo = mid + 1
    cands = [x for x in (lo - 1, lo) if x >= 1]
    return min(cands, key=lambda x: (abs(f(x) - target), -x))


def small_dense_dims(sparsity: float, model_params: dict | None = None,
                     vocab_size: int | None = None) -> SmallDense:
    """The dense lfm whose prunable-weight count is closest to (1 - s) x the full model's.

    Narrowing rule: d_model and expert_dim shrink together (e = round(d * E / D), the default
    shape) to the d whose count is closest; then, at that d and its neighbours, expert_dim alone
    is tuned for the closest count. Everything else (layers, experts, adapt sizes) is kept;
    the channel mixer's hidden width is 2 d_model by construction.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    mp = dict(DEFAULTS["model"] if model_params is None else model_params)
    if mp["arch"] != "lfm":
        raise ValueError("small_dense_dims narrows the lfm widths (model.arch lfm)")
    vocab = DEFAULTS["data"]["vocab_size"] if vocab_size is None else vocab_size
    big_d, big_e = mp["d_model"], mp["expert_dim"]

    def count(d: int, e: int) -> int:
        return prunable_count({**mp, "d_model": d, "expert_dim": e}, vocab)

    full = count(big_d, big_e)
    target = (1 - sparsity) * full
    shape = lambda d: max(1, round(d * big_e / big_d))  # noqa: E731
    d0 = _closest(lambda d: count(d, shape(d)), big_d, target)
    best = None
    for d in sorted({max(1, d0 - 1), d0, min(big_d, d0 + 1)}):
        e = _closest(lambda e, d=d: count(d, e), big_e, target)
        cand = (abs(count(d, e) - target), -d, d, e)
        best = cand if best is None or cand < best else best
    _, _, d, e = best
    return SmallDense(d, e, count(d, e), target, count(d, e) / full)


# ---------------------------------------------------------------------------- points

def _fmt(v: float) -> str:
    return f"m{abs(v):g}" if v < 0 else f"{v:g}"


def _yaml(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Point:
    """One run of the design. `sparsity` is the arm's target (None for dense, adaptive_bare),
    `budget` a multiple of UNIT_STEPS; `overrides` the full `-S` set, sorted."""
    arm: str
    seed: int
    sparsity: float | None
    budget: int
    lambda_entropy: float
    lambda_balance: float
    overrides: tuple[tuple[str, Any], ...]

    @property
    def steps(self) -> int:
        return self.budget * UNIT_STEPS

    @property
    def study(self) -> str:
        """'lambda' for the lambda sub-study's points, else 'main' (the default lambdas)."""
        return "main" if self.lambdas_default else "lambda"

    @property
    def lambdas_default(self) -> bool:
        return (self.lambda_entropy == DEFAULTS["lambda_entropy"]
                and self.lambda_balance == DEFAULTS["train"]["lambda_balance"])

    def name(self, sweep_id: str) -> str:
        """`<id>-<arm>[-p<s>]-b<budget>x[-l<lambda>-lb<balance>]-s<seed>`: lambdas only when
        they differ from the defaults, so the lambda sub-study's default point is the dense
        arm's own run, not a duplicate."""
        parts = [sweep_id, self.arm.replace("_", "")]
        if self.sparsity is not None:
            parts.append(f"p{_fmt(self.sparsity)}")
        parts.append(f"b{self.budget}x")
        if not self.lambdas_default:
            parts += [f"l{_fmt(self.lambda_entropy)}", f"lb{_fmt(self.lambda_balance)}"]
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def sets(self) -> list[str]:
        """The `-S key=value` strings, as `dvc exp run` takes them."""
        return [f"{k}={_yaml(v)}" for k, v in self.overrides]


def point(arm: str, seed: int, sparsity: float | None = None, budget: int = 1,
          lambda_entropy: float | None = None, lambda_balance: float | None = None,
          common: dict[str, Any] | None = None) -> Point:
    """Build a point: common overrides, then the arm's, then steps, lambdas and seed."""
    lam = DEFAULTS["lambda_entropy"] if lambda_entropy is None else lambda_entropy
    bal = DEFAULTS["train"]["lambda_balance"] if lambda_balance is None else lambda_balance
    ov: dict[str, Any] = {**(common or {}), **arm_overrides(arm, sparsity),
                          "train.steps": budget * UNIT_STEPS, "seed": seed}
    if lam != DEFAULTS["lambda_entropy"]:
        ov["lambda_entropy"] = lam
    if bal != DEFAULTS["train"]["lambda_balance"]:
        ov["train.lambda_balance"] = bal
    return Point(arm, seed, sparsity, budget, float(lam), float(bal), tuple(sorted(ov.items())))


@dataclass(frozen=True)
class RunCost:
    """Cost model: CPU-seconds of a run = steps x sec_per_step + overhead_s. sec_per_step is
    measured at batch_size with one torch thread (the design sets train.batch_size to it).
    Sparse arms cost as much as dense (masked dense matmuls, DESIGN.md) and the small dense
    models are charged as dense too: an upper bound."""
    sec_per_step: float
    batch_size: int
    overhead_s: float = RUN_OVERHEAD_S
    queue_s: float = QUEUE_S

    def run_seconds(self, p: Point) -> float:
        return p.steps * self.sec_per_step + self.overhead_s


@dataclass(frozen=True)
class Design:
    points: tuple[Point, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def seeds(self) -> list[int]:
        return sorted({p.seed for p in self.points})

    def _all_points(self) -> tuple[Point, ...]:
        """The points, phase 2 included: with adaptive_bare in the design, the study adds
        static_matched at 1x for every seed once those runs are done (lfmodel.study)."""
        later = matched_static(BARE_MAX_SPARSITY, self.seeds).points if any(
            p.arm == "adaptive_bare" for p in self.points) else ()
        return (*self.points, *later)

    def cpu_seconds(self, cost: RunCost) -> float:
        """Predicted CPU-s of the runs, phase 2 included."""
        return sum(cost.run_seconds(p) for p in self._all_points())

    def wall_seconds(self, cost: RunCost, cores: int) -> float:
        """Predicted wall time on `cores` (one run per core, the queue kept full), plus what
        runs alone: queueing each run before the queue starts, the study's calibration and
        report."""
        return (self.cpu_seconds(cost) / cores + cost.queue_s * len(self._all_points())
                + STUDY_FIXED_S)

    def experiments(self, sweep_id: str) -> dict[str, Point]:
        """{experiment name: point}; a repeated name is an error, not a silent overwrite."""
        out: dict[str, Point] = {}
        for p in self.points:
            n = p.name(sweep_id)
            if n in out:
                raise ValueError(f"two design points share the experiment name {n!r}")
            out[n] = p
        return out

    def without(self, drop: Callable[[Point], bool], note: str) -> Design:
        return Design(tuple(p for p in self.points if not drop(p)), (*self.notes, note))


def _dedup(points: Iterable[Point]) -> tuple[Point, ...]:
    seen: dict[tuple, Point] = {}
    for p in points:
        seen.setdefault(p.overrides, p)
    return tuple(seen.values())


def full_design(seeds: Sequence[int] = FULL_SEEDS, best_baselines: Sequence[str] = BEST_BASELINES,
                common: dict[str, Any] | None = None) -> Design:
    """The complete design (a cluster's): every arm of SPARSE_ARMS and small_dense at each of
    SPARSITIES, dense and adaptive_bare, at 1x; at 4x dense, `best_baselines` and the
    surge-collapse arms at BUDGET_SPARSITY; the lambda sub-study on dense at 1x
    (LAMBDAS x balance {0, BALANCE_ON}); the same seeds in every arm."""
    bad = [b for b in best_baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"best_baselines must be among {BASELINES}, got {bad}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    c = common or {}
    pts: list[Point] = []
    for seed in seeds:  # seed-major: a grid cut short still has every arm
        pts.append(point("dense", seed, common=c))
        pts.append(point("adaptive_bare", seed, common=c))
        for s in SPARSITIES:
            pts += [point(a, seed, s, common=c) for a in ("small_dense", *SPARSE_ARMS)]
        pts.append(point("dense", seed, budget=4, common=c))
        for a in dict.fromkeys((*best_baselines, *SURGE_ARMS)):
            pts.append(point(a, seed, BUDGET_SPARSITY, budget=4, common=c))
        for lam in LAMBDAS:
            for bal in (0.0, BALANCE_ON):
                pts.append(point("dense", seed, lambda_entropy=lam, lambda_balance=bal, common=c))
    return Design(_dedup(pts), (f"full design: {len(set(seeds))} seeds, sparsities "
                                f"{list(SPARSITIES)}, budgets {list(BUDGETS)}x",))


def matched_static(reached: float, seeds: Sequence[int], budget: int = 1,
                   common: dict[str, Any] | None = None) -> Design:
    """Follow-up grid: static at the sparsity adaptive_bare reached (its seeds' mean measured
    sparsity, rounded to 0.01), so the bare controller is compared at its own sparsity."""
    s = round(reached, 2)
    if not 0 < s < 1:
        raise ValueError(f"reached sparsity must round into (0, 1), got {reached}")
    return Design(tuple(point("static_matched", seed, s, budget, common=common) for seed in seeds),
                  (f"static at the bare controller's reached sparsity {s:g}",))


# ---------------------------------------------------------------------------- trimming

def _drop_top_seed(floor: int) -> Callable[[Design], Design | None]:
    def step(d: Design) -> Design | None:
        seeds = d.seeds
        if len(seeds) <= floor:
            return None
        top = seeds[-1]
        return d.without(lambda p: p.seed == top, f"dropped seed {top} from every arm "
                                                  f"({len(seeds) - 1} seeds left)")
    return step


def _once(drop: Callable[[Point], bool], note: str) -> Callable[[Design], Design | None]:
    def step(d: Design) -> Design | None:
        if not any(drop(p) for p in d.points):
            return None
        return d.without(drop, note)
    return step


def trim_steps(best_baselines: Sequence[str] = BEST_BASELINES
               ) -> list[Callable[[Design], Design | None]]:
    """The order in which a design is cut to fit a budget. Each step removes a whole slice
    (a seed from every arm, a sparsity from every arm, or arms at the 4x budget together with
    what they are compared with), never single runs, so every comparison left keeps all its
    pairs. A step returns None when it has nothing left to cut.
      1. seeds beyond 5, highest first (5 is the issue's minimum for the full design);
      2. sparsity 0.5 (the old 400-step study's point; 0.8 keeps the budget comparison);
      3. at 4x: keep dense, the best baseline and adaptive (the claim's arm);
      4. sparsity 0.9;
      5. at 4x: keep only dense (the known-answer check, dense at 4x <= 0.05 nats);
      6. seeds down to 3, highest first (MIN_SEEDS: fewer give no interval).
    """
    keep4 = {"dense", best_baselines[0] if best_baselines else "static", "adaptive"}
    return [
        _drop_top_seed(5),
        _once(lambda p: p.sparsity == 0.5, "dropped sparsity 0.5 from every arm"),
        _once(lambda p: p.budget > 1 and p.arm not in keep4,
              f"4x budget kept only for {sorted(keep4)}"),
        _once(lambda p: p.sparsity == 0.9, "dropped sparsity 0.9 from every arm"),
        _once(lambda p: p.budget > 1 and p.arm != "dense", "4x budget kept only for dense"),
        _drop_top_seed(MIN_SEEDS),
    ]


def trim(design: Design, cost: RunCost, wall_budget_s: float, cores: int,
         best_baselines: Sequence[str] = BEST_BASELINES) -> Design:
    """Apply trim_steps in order, each as often as it can, until the predicted wall time fits.
    If the smallest design still does not fit, it is returned with a note saying by how much."""
    d = design
    for step in trim_steps(best_baselines):
        while d.wall_seconds(cost, cores) > wall_budget_s:
            nxt = step(d)
            if nxt is None or nxt.wall_seconds(cost, cores) >= d.wall_seconds(cost, cores):
                break  # nothing left to cut here (or a cut that saves nothing: no endless loop)
            d = nxt
    if d.wall_seconds(cost, cores) > wall_budget_s:
        d = replace(d, notes=(*d.notes, f"does not fit: {d.wall_seconds(cost, cores) / 60:.0f} "
                                        f"min predicted > budget {wall_budget_s / 60:.0f}"))
    return d


def default_design(sec_per_step: float, batch_size: int, minutes: float = 90.0,
                   cores: int = 2, overhead_s: float = RUN_OVERHEAD_S,
                   best_baselines: Sequence[str] = BEST_BASELINES
                   ) -> tuple[Design, float, float]:
    """The `make study` design: the full one trimmed until its predicted wall time
    (Design.wall_seconds: one torch thread per run, `cores` runs at once) fits `minutes`.
    Returns the design, its predicted CPU-seconds and wall seconds."""
    if sec_per_step <= 0 or batch_size <= 0 or minutes <= 0 or cores <= 0:
        raise ValueError("sec_per_step, batch_size, minutes and cores must be positive")
    cost = RunCost(sec_per_step, batch_size, overhead_s)
    common = {"train.batch_size": batch_size, "train.threads": 1}
    d = trim(full_design(common=common, best_baselines=best_baselines), cost, minutes * 60,
             cores, best_baselines)
    cpu, wall = d.cpu_seconds(cost), d.wall_seconds(cost, cores)
    note = (f"predicted {cpu / 3600:.2f} CPU-h, ~{wall / 60:.0f} min wall on {cores} cores "
            f"at {sec_per_step:g} s/step (batch {batch_size}) + {overhead_s:g} s per run, "
            f"phase 2 and queueing included")
    return replace(d, notes=(*d.notes, note)), cpu, wall


def comparable(design: Design) -> list[str]:
    """Problems that would break a paired comparison: an arm whose seeds differ from the
    design's, or a non-baseline sparse arm at a (sparsity, budget) with no baseline there."""
    seeds = set(design.seeds)
    out = []
    by_arm: dict[tuple, set[int]] = {}
    for p in design.points:
        by_arm.setdefault((p.arm, p.sparsity, p.budget, p.lambda_entropy, p.lambda_balance),
                          set()).add(p.seed)
    for key, s in by_arm.items():
        if s != seeds:
            out.append(f"{key} has seeds {sorted(s)}, the design {sorted(seeds)}")
    groups = {(k[1], k[2]) for k in by_arm if k[0] in BASELINES}
    for k in by_arm:
        if k[0] in SURGE_ARMS and (k[1], k[2]) not in groups:
            out.append(f"{k[0]} at sparsity {k[1]}, {k[2]}x has no baseline")
    return out

