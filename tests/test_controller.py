"""The adaptive surge-collapse controller (lfmodel/sparsity/controller.py, DESIGN.md
"Adaptive controller").

Unit tests force the activation entropy the controller sees (a hook placed before it sets each
group's `act_entropy` after the forward pass), so every rule fires at a known step on a tiny
model; one real run with every param at its default (model, data, thresholds) checks that every
rule fires from measured entropies, stopped as soon as the last one has.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_sparsity import OptimizerLr
from test_training import train_config

from lfmodel.checkpoint import load_state, save_state
from lfmodel.config import validate
from lfmodel.data import prepare_regimes
from lfmodel.models import build_model
from lfmodel.sparsity import RULES, AdaptiveController, build_schedule
from lfmodel.training import TrainConfig, Trainer, seed_everything

FIELDS = {"step", "layer", "rule", "H", "sparsity_before", "sparsity_after", "lr"}
LR = 0.01
TINY_MODEL = {"d_model": 8, "num_layers": 1, "num_experts": 2, "expert_dim": 8, "adapt_dim": 4,
              "adapt_rank": 2}
EXPERT, MIX, TOKEN = "block0.moe.expert0", "block0.channel_mix", "block0.token_mix"


def surge(**over) -> dict:
    base = {"mode": "adaptive", "check_every": 5, "ema": 0.5, "high": 0.9, "low": 0.3,
            "step_sparsity": 0.1, "max_sparsity": 0.5, "energy_boost": 2.0, "energy_steps": 10,
            "pump_fraction": 0.1, "input_noise": 0.1, "noise_steps": 10, "plateau_window": 3,
            "plateau_eps": 0.002, "floor_end_fraction": 0.0}
    return validate({"surge": {**base, **over}})["surge"]


def tiny_data(seq_len: int = 16, n_train: int = 64) -> dict:
    d = validate({"data": {"seq_len": seq_len, "n_train": n_train, "n_val": 16, "n_test": 16}})
    splits, _ = prepare_regimes(d["data"], 0)  # numpy; the tests index them as tensors
    return {k: {n: torch.as_tensor(a) for n, a in v.items()} for k, v in splits.items()}


class Force:
    """Sets each group's measured activation entropy to script(step, name) (None: leave it)."""

    def __init__(self, script) -> None:
        self.script = script

    def after_backward(self, trainer: Trainer, step: int) -> None:
        for name, g in trainer.groups.items():
            value = self.script(step, name)
            if value is not None:
                g.act_entropy = torch.tensor(value)


def weight_zeros(params) -> float:
    """Zero fraction counted in the weights themselves (independent of MaskSet.sparsity)."""
    params = list(params)
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


class Record:
    """Per step (after the optimizer step): lr, lr_scale, input noise, sparsity from weights."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        masks = trainer.masks
        self.rows[step] = {
            "lr": trainer.current_lr, "scale": trainer.lr_scale,
            "noise": {n: g.input_noise for n, g in trainer.groups.items()},
            "sparsity": {g: weight_zeros(masks.params[n] for n in names)
                         for g, names in masks.groups.items()}}


def make_trainer(params: dict, steps: int, hooks: list, splits: dict | None = None) -> Trainer:
    seed_everything(0, 1)
    splits = splits or tiny_data()
    model = build_model(validate({"model": TINY_MODEL})["model"], 32)
    cfg = train_config(steps=steps, batch_size=8, lr=LR, warmup_steps=0, cosine=False,
                       eval_every=10_000, log_every=10_000)
    return Trainer(model, splits["train"], splits["val"], cfg, hooks)


def run(script, steps: int, **over) -> tuple[Trainer, AdaptiveController, Record]:
    ctl = AdaptiveController(surge(**over), steps, torch.Generator().manual_seed(1))
    rec = Record()
    trainer = make_trainer({}, steps, [Force(script), ctl, rec])
    trainer.fit()
    return trainer, ctl, rec


def by_rule(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e["rule"], []).append(e)
    return out


# ---------------------------------------------------------------- wiring
def test_build_schedule_adaptive_and_monitor_steps():
    ctl = build_schedule(surge(), 100, 0)
    assert isinstance(ctl, AdaptiveController)
    assert [s for s in range(1, 21) if ctl.wants_monitor(s)] == [5, 10, 15, 20]


# ---------------------------------------------------------------- rule 1: high entropy
def test_high_collapses_pumps_and_injects_energy():
    """H > high at step 5: collapse by step_sparsity, pump at constant sparsity, lr x boost
    decaying linearly to 1 over energy_steps. At max_sparsity the collapse stops, pump and
    energy go on; a high layer never also gets a plateau collapse."""
    trainer, ctl, rec = run(lambda s, n: 0.95 if n == EXPERT else 0.5 + 0.01 * s, 20,
                            max_sparsity=0.2)
    ev = by_rule(trainer.events)
    assert all(FIELDS <= set(e) for e in trainer.events)
    assert [(e["step"], e["layer"]) for e in ev["collapse_high"]] == [(5, EXPERT), (10, EXPERT)]
    assert [e["step"] for e in ev["pump"]] == [5, 10, 15, 20]
    assert [e["step"] for e in ev["energy"]] == [5, 10, 15, 20]
    assert "plateau_collapse" not in ev and "noise" not in ev

    first, second = ev["collapse_high"]
    assert first["sparsity_before"] == 0.0
    assert first["sparsity_after"] == pytest.approx(0.1, abs=0.01)
    assert second["sparsity_after"] == pytest.approx(0.2, abs=0.01)
    assert first["H"] == pytest.approx(0.95) and first["entries"] > 0
    # sparsity (measured from the weights) moves exactly at the event steps
    s = [rec.rows[i]["sparsity"][EXPERT] for i in range(1, 21)]
    assert s[:4] == [0.0] * 4
    assert s[4] == pytest.approx(0.1, abs=0.01) and s[9] == pytest.approx(0.2, abs=0.01)
    assert s[10:] == pytest.approx([s[9]] * 10, abs=0.01)
    assert all(v == 0.0 for i in range(1, 21) for g, v in rec.rows[i]["sparsity"].items()
               if g != EXPERT)
    # the pump rewires at constant sparsity: some entries move, the count stays
    for e in ev["pump"]:
        assert e["entries"] > 0 and e["sparsity_after"] == pytest.approx(e["sparsity_before"])
    # energy: the event reports the boosted lr; it decays back to 1x by energy_steps
    assert ev["energy"][0]["lr"] == pytest.approx(2 * LR)
    assert rec.rows[4]["lr"] == pytest.approx(LR)
    assert rec.rows[5]["lr"] == pytest.approx(2 * LR)
    assert rec.rows[7]["scale"] == pytest.approx(1 + 0.8)  # 2 steps of 10 into the decay
    ctl.energy_start = 5
    assert [ctl.energy_scale(s) for s in (4, 5, 10, 15, 30)] == pytest.approx(
        [1.0, 2.0, 1.5, 1.0, 1.0])
    assert trainer.lr_scale == 1.0  # reset at the end of training


# ---------------------------------------------------------------- rule 2: low entropy
def test_low_adds_input_noise_for_noise_steps():
    trainer, ctl, rec = run(lambda s, n: 0.1 if (n == TOKEN and s == 5) else 0.5 + 0.01 * s,
                            20)
    ev = by_rule(trainer.events)
    assert list(ev) == ["noise"]
    (e,) = ev["noise"]
    assert FIELDS <= set(e)
    assert (e["step"], e["layer"], e["until"]) == (5, TOKEN, 15)
    # EMA 0.5: the step-5 value initializes it; later steps pull it above `low` again
    assert e["H"] == pytest.approx(0.1) and e["sparsity_before"] == e["sparsity_after"] == 0.0
    noise = [rec.rows[i]["noise"][TOKEN] for i in range(1, 21)]
    assert noise == [0.0] * 4 + [0.1] * 10 + [0.0] * 6  # steps 6..15 train with noise
    assert all(rec.rows[i]["noise"][MIX] == 0.0 for i in range(1, 21))
    assert all(g.input_noise == 0.0 for g in trainer.groups.values())  # cleared at the end


def test_input_noise_only_in_training_mode():
    trainer = make_trainer({}, 1, [])
    x = trainer.val_x[:4]
    model = trainer.model.eval()
    clean = model(x)
    for g in trainer.groups.values():
        g.input_noise = 1.0
    assert torch.equal(model(x), clean)
    model.train()
    assert not torch.allclose(model(x), clean)


# ---------------------------------------------------------------- rule 3: plateau
def test_plateau_collapses_up_to_max_sparsity():
    """Flat H: a plateau is seen once plateau_window + 1 checks exist (step 20), then on every
    check until max_sparsity; a layer whose H keeps moving never plateaus."""
    trainer, ctl, rec = run(lambda s, n: 0.7 if n == MIX else 0.3 + 0.01 * s, 40,
                            max_sparsity=0.3)
    ev = by_rule(trainer.events)
    assert list(ev) == ["plateau_collapse"]
    got = [(e["step"], e["layer"], round(e["sparsity_after"], 1)) for e in ev["plateau_collapse"]]
    assert got == [(20, MIX, 0.1), (25, MIX, 0.2), (30, MIX, 0.3)]
    assert all(FIELDS <= set(e) for e in ev["plateau_collapse"])
    assert rec.rows[19]["sparsity"][MIX] == 0.0
    assert rec.rows[20]["sparsity"][MIX] == pytest.approx(0.1, abs=0.01)
    assert rec.rows[40]["sparsity"][MIX] == pytest.approx(0.3, abs=0.01)


def test_low_and_plateau_can_fire_together():
    trainer, _, _ = run(lambda s, n: 0.1 if n == TOKEN else 0.5 + 0.01 * s, 20)
    rules = Counter((e["step"], e["rule"]) for e in trainer.events if e["layer"] == TOKEN)
    assert rules[(20, "noise")] == 1 and rules[(20, "plateau_collapse")] == 1


# ---------------------------------------------------------------- the sparsity floor
def test_floor_brings_every_layer_to_target_on_a_linear_ramp():
    """floor_end_fraction 0.5 of 40 steps, target 0.4: at check s every layer is at least
    0.4 * min(1, s / 20); a layer the rules already pushed ahead is left alone; at the end all
    layers sit at target_sparsity (as static/interval/rigl do), measured from the weights."""
    trainer, ctl, rec = run(lambda s, n: 0.95 if (n == EXPERT and s == 5) else 0.5 + 0.01 * s,
                            40, floor_end_fraction=0.5, target_sparsity=0.4, max_sparsity=0.4,
                            step_sparsity=0.2)
    ev = by_rule(trainer.events)
    assert [ctl.floor(s) for s in (0, 5, 10, 20, 40)] == pytest.approx([0, 0.1, 0.2, 0.4, 0.4])
    assert all(FIELDS <= set(e) for e in ev["floor"])
    groups = set(trainer.masks.groups)
    # step 5: the expert went to 0.2 by collapse_high, so the floor (0.1) skips it
    assert {e["layer"] for e in ev["floor"] if e["step"] == 5} == groups - {EXPERT}
    assert sorted({e["step"] for e in ev["floor"]}) == [5, 10, 15, 20]
    for step in (5, 10, 15, 20, 30, 40):
        for g in groups:
            assert rec.rows[step]["sparsity"][g] >= ctl.floor(step) - 0.01, (step, g)
    assert rec.rows[4]["sparsity"][MIX] == 0.0
    assert all(rec.rows[40]["sparsity"][g] == pytest.approx(0.4, abs=0.01) for g in groups)
    assert weight_zeros(trainer.masks.params.values()) == pytest.approx(0.4, abs=0.01)


def test_floor_needs_max_sparsity_at_least_target():
    from lfmodel.config import ParamsError
    with pytest.raises(ParamsError, match="max_sparsity"):
        validate({"surge": {"mode": "adaptive", "target_sparsity": 0.5, "max_sparsity": 0.3}})
    validate({"surge": {"mode": "adaptive", "target_sparsity": 0.5, "max_sparsity": 0.3,
                        "floor_end_fraction": 0.0}})


# ---------------------------------------------------------------- checkpoint state
def test_state_dict_is_json_and_resume_is_exact(tmp_path):
    """Checkpoint at step 14 (noise armed until 20, energy decaying, EMA history of 2 checks),
    resume in a fresh trainer + controller: same losses, events and weights as one run."""

    def script(s, n):
        if n == EXPERT:
            return 0.95 if s == 10 else 0.6
        return 0.1 if n == TOKEN else 0.6

    path = tmp_path / "ckpt.safetensors"

    class Save:
        def on_step_end(self, trainer, step, metrics):
            if step == 14:
                save_state(path, trainer.state_dict())

    splits = tiny_data()
    ctl = AdaptiveController(surge(ema=0.0), 25, torch.Generator().manual_seed(1))
    full = make_trainer({}, 25, [Force(script), ctl, Save()], splits)
    full.fit()
    rules = {e["rule"] for e in full.events}
    assert {"collapse_high", "pump", "energy", "noise", "plateau_collapse"} <= rules

    state = ctl.state_dict()
    assert json.loads(json.dumps(state)) == state
    other = AdaptiveController(surge(ema=0.0), 25, torch.Generator().manual_seed(1))
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.state_dict() == state

    ctl2 = AdaptiveController(surge(ema=0.0), 25, torch.Generator().manual_seed(1))
    resumed = make_trainer({}, 25, [Force(script), ctl2], splits)
    resumed.load_state_dict(load_state(path))
    assert resumed.step == 14 and ctl2.noise_until == {TOKEN: 20}
    resumed.fit()
    assert resumed.losses == full.losses
    assert resumed.events == full.events
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(),
                              strict=True):
        assert torch.equal(p, q), n
    assert ctl2.state_dict() == ctl.state_dict()


# ---------------------------------------------------------------- event lr
def test_event_lr_is_the_lr_the_optimizer_used():
    """Cosine lr and an energy boost decaying over the next checks: every event (energy
    included, and events of later checks inside the decay) carries the lr of its step's update."""
    def script(s, n):
        return 0.95 if (n == EXPERT and s in (5, 15)) else 0.1 if n == TOKEN else 0.6

    ctl = AdaptiveController(surge(ema=0.0, energy_steps=12), 30, torch.Generator().manual_seed(1))
    probe = OptimizerLr()
    seed_everything(0, 1)
    splits = tiny_data()
    model = build_model(validate({"model": TINY_MODEL})["model"], 32)
    cfg = train_config(steps=30, batch_size=8, lr=LR, warmup_steps=3, cosine=True,
                       eval_every=10_000, log_every=10_000)
    trainer = Trainer(model, splits["train"], splits["val"], cfg, [Force(script), ctl, probe]).fit()
    rules = {e["rule"] for e in trainer.events}
    assert {"collapse_high", "pump", "energy", "noise", "plateau_collapse"} <= rules, rules
    assert {e["step"] for e in trainer.events if e["rule"] == "energy"} == {5, 15}
    for e in trainer.events:
        assert probe.lr[e["step"]] == [e["lr"]], e


# ---------------------------------------------------------------- a real run at the defaults
class StopWhen(Exception):
    pass


class StopWhenAllFired:
    """Ends the run (an exception the test catches) once every rule has fired: the run up to
    there is exactly the default run's, and the test takes no longer than it must."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict) -> None:
        if {e["rule"] for e in trainer.events} >= set(RULES):
            raise StopWhen(step)


def test_default_thresholds_fire_every_rule_on_the_default_data():
    """DESIGN.md: the defaults make every rule fire on the default data (a rule that never
    fires is dead). params = config.DEFAULTS with surge.mode adaptive and nothing else changed
    (model, data, thresholds, steps); one thread. Measured with the model of this commit:
    collapse_high, pump, energy and floor first fire at step 50, plateau_collapse at 350,
    noise at 550 (block1.moe.expert0, whose activation entropy falls to ~0.33)."""
    params = validate({"surge": {"mode": "adaptive"}})
    seed_everything(params["seed"], 1)
    splits, meta = prepare_regimes(params["data"], params["seed"])
    model = build_model(params["model"], meta["vocab_size"])
    cfg = TrainConfig.from_params(params)
    ctl = build_schedule(params["surge"], cfg.steps, params["seed"])
    rec = Record()
    trainer = Trainer(model, splits["train"], splits["val"], cfg, [ctl, rec, StopWhenAllFired()])
    with pytest.raises(StopWhen):
        trainer.fit()
    counts = Counter(e["rule"] for e in trainer.events)
    assert set(counts) == set(RULES), counts
    assert all(FIELDS <= set(e) for e in trainer.events)
    for e in trainer.events:
        if e["rule"] in ("collapse_high", "plateau_collapse", "floor"):
            step, layer = e["step"], e["layer"]
            assert e["sparsity_after"] > e["sparsity_before"]
            assert rec.rows[step]["sparsity"][layer] > rec.rows[step - 1]["sparsity"][layer]
