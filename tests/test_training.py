"""The training loop on small regimes data: the sign of lambda_entropy, that the LFModel
learns, determinism, and the hook interface through which snapshots and events flow out."""

from __future__ import annotations

import math

import pytest
import torch

from lfmodel.checkpoint import Checkpointer, load_state
from lfmodel.config import validate
from lfmodel.data import bigram_loss, prepare_regimes, unigram_loss
from lfmodel.entropy import gate_entropies
from lfmodel.models import AutoRegressiveModel, LFModel
from lfmodel.sparsity import build_schedule
from lfmodel.training import DivergenceError, TrainConfig, Trainer, seed_everything, task_loss

V = 8
DATA = {"num_regimes": 2, "vocab_size": V, "dirichlet_alpha": 0.2, "switch_prob": 1 / 32,
        "seq_len": 32, "n_train": 256, "n_val": 64, "n_test": 16}
LAMBDA_STEPS = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


@pytest.fixture(scope="module")
def regimes():
    splits, meta = prepare_regimes(DATA, seed=0)  # numpy; the tests index them as tensors
    return {k: {n: torch.as_tensor(a) for n, a in v.items()} for k, v in splits.items()}, meta


def lfm(seed: int = 0) -> LFModel:
    seed_everything(seed, 1)
    return LFModel(V, d_model=16, num_layers=1, num_experts=4, expert_dim=16, adapt_dim=8,
                   adapt_rank=2)


def train_config(lambda_entropy: float = 0.0, seed: int = 0, **train) -> TrainConfig:
    """TrainConfig the only way the package builds one: params (DEFAULTS filled in) ->
    from_params. Shared by the sparsity and controller tests."""
    return TrainConfig.from_params(validate({"train": train, "lambda_entropy": lambda_entropy,
                                             "seed": seed}))


def config(steps: int, **kw) -> TrainConfig:
    return train_config(**{"steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5,
                           "eval_every": 10**6, "log_every": 10**6, **kw})


def mean_token_entropy(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        _, gates = model(x, return_gates=True)
    return sum(float(gate_entropies(g)[0]) for g in gates) / len(gates)


@pytest.fixture(scope="module")
def lambda_runs(regimes):
    """One LFModel run per lambda_entropy, same seed and data: {lambda: (trainer, H_token)}."""
    splits, _ = regimes
    out = {}
    for lam in (0.1, 0.0, -0.1):
        trainer = Trainer(lfm(0), splits["train"], splits["val"],
                          config(LAMBDA_STEPS, lambda_entropy=lam)).fit()
        out[lam] = (trainer, mean_token_entropy(trainer.model, splits["val"]["inputs"]))
    return out


def test_lambda_entropy_sign_orders_token_entropy(lambda_runs):
    h = {lam: run[1] for lam, run in lambda_runs.items()}
    # +lambda penalizes token entropy (specialization), -lambda rewards it (mixing)
    assert h[0.1] < h[0.0] < h[-0.1], h
    assert h[0.0] - h[0.1] > 0.1 and h[-0.1] - h[0.0] > 0.01, h
    assert h[-0.1] <= math.log(4) + 1e-6


class GateGrad:
    """The dense gradient of each block's gate weight right after backward (before clipping)."""

    def __init__(self) -> None:
        self.grads: list[torch.Tensor] = []

    def after_backward(self, trainer, step):
        self.grads = [b.moe.gate.weight.grad.clone() for b in trainer.model.blocks]


def test_lambda_entropy_is_in_the_trained_loss(regimes):
    """The gradient the optimizer gets is d task/dW + lambda * d(sum over layers of mean_t
    H(g_t))/dW, with H computed here by hand from the model's gates: the entropy part moves
    linearly with lambda and changes sign with it. Every batch row is the same sequence, so the
    trainer's batch is known without replaying its sampler."""
    splits, _ = regimes
    one = {k: v[:1].repeat(16, 1) for k, v in splits["train"].items() if k in ("inputs", "targets")}
    grads = {}
    for lam in (-1.0, 0.0, 1.0):
        probe = GateGrad()
        Trainer(lfm(0), one, splits["val"], config(1, lambda_entropy=lam), [probe]).fit()
        grads[lam] = probe.grads
    model = lfm(0)
    _, gates = model(one["inputs"][:1], return_gates=True)
    h = sum(-(g * g.log()).sum(-1).mean() for g in gates)
    dh = torch.autograd.grad(h, [b.moe.gate.weight for b in model.blocks])
    for i, d in enumerate(dh):
        assert float(d.abs().max()) > 1e-3
        for lam in (-1.0, 1.0):
            torch.testing.assert_close(grads[lam][i] - grads[0.0][i], lam * d,
                                       rtol=1e-3, atol=1e-5)


def test_lfmodel_trains_below_unigram(regimes, lambda_runs):
    splits, _ = regimes
    tr, va = splits["train"], splits["val"]
    unigram = unigram_loss(tr["targets"], va["targets"], V)
    bigram = bigram_loss(tr["inputs"], tr["targets"], va["inputs"], va["targets"], V)
    trainer = lambda_runs[0.0][0]
    val = trainer.evaluate()
    assert trainer.losses[0] > unigram - 0.05          # starts near chance
    assert val < unigram - 0.25, (val, unigram, bigram)
    assert val < bigram + 0.1, (val, bigram)
    assert val > float(va["bayes_nll"].mean()) - 0.02   # and never beats the Bayes optimum


def test_evaluate_in_chunks_is_the_loss_of_one_forward(regimes, lambda_runs):
    """evaluate runs the forward in chunks (peak memory); the loss is that of the whole batch,
    bit for bit, and of every sequence (an uneven last chunk, several loss batches)."""
    splits, _ = regimes
    trainer = lambda_runs[0.0][0]
    x, y = splits["val"]["inputs"][:50], splits["val"]["targets"][:50]
    trainer.model.eval()
    with torch.no_grad():
        whole = float(task_loss(trainer.model(x), y))
    assert trainer.evaluate(x, y, batch_size=50, chunk=16) == whole
    batched = trainer.evaluate(x, y, batch_size=20, chunk=7)
    assert math.isclose(batched, whole, rel_tol=1e-6)
    assert batched != trainer.evaluate(x[:40], y[:40], batch_size=20, chunk=7)


def run_once(splits, seed: int) -> Trainer:
    surge = {"mode": "interval", "target_sparsity": 0.5, "scope": "layer", "collapse_every": 10,
             "surge_every": 20, "regrow": "random", "recovery": 0.25, "noise_scale": 0.5}
    cfg = config(30, lambda_entropy=0.05, seed=seed, log_every=10, eval_every=15)
    model = lfm(seed)
    return Trainer(model, splits["train"], splits["val"], cfg,
                   [build_schedule(surge, cfg.steps, seed)]).fit()


def test_determinism_same_seed_identical_losses(regimes):
    splits, _ = regimes
    a, b = run_once(splits, 3), run_once(splits, 3)
    assert a.losses == b.losses
    assert a.val_history == b.val_history
    assert [e["entries"] for e in a.events] == [e["entries"] for e in b.events]
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    for n in a.masks.masks:
        assert torch.equal(a.masks.masks[n], b.masks.masks[n]), n
    c = run_once(splits, 4)
    assert c.losses != a.losses


class Probe:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.metrics: dict[int, dict] = {}
        self.events: list[dict] = []

    def on_train_start(self, trainer):
        self.calls.append("start")

    def on_step_end(self, trainer, step, metrics):
        if metrics:
            self.metrics[step] = dict(metrics)

    def on_event(self, trainer, event):
        self.events.append(event)

    def on_train_end(self, trainer):
        self.calls.append("end")


def test_hooks_receive_snapshots_and_events(regimes):
    splits, _ = regimes
    probe = Probe()
    sched = build_schedule({"mode": "static", "target_sparsity": 0.5, "scope": "layer",
                            "start_fraction": 0.5}, 12, 0)
    trainer = Trainer(lfm(0), splits["train"], splits["val"],
                      config(12, log_every=4, eval_every=6, lambda_entropy=0.01),
                      [sched, probe]).fit()
    assert probe.calls == ["start", "end"]
    assert [(e["step"], e["rule"]) for e in probe.events] == [(6, "collapse")]
    assert probe.events == trainer.events
    assert sorted(probe.metrics) == [4, 6, 8, 12]      # log steps, the event step, eval steps
    m = probe.metrics[8]
    for key in ("loss/train", "loss/total", "lr", "sparsity/all", "gates/block0.token_entropy",
                "gates/block0.usage_entropy", "entropy/act/block0.token_mix"):
        assert key in m, key
    assert abs(m["sparsity/all"] - 0.5) < 0.01
    # step 6 (the event) is not a monitor step: no activation entropy, not step 4's stale one
    assert not [k for k in probe.metrics[6] if k.startswith("entropy/act/")]
    assert "entropy/act/block0.token_mix" in probe.metrics[4]
    assert 0.0 <= m["entropy/act/block0.token_mix"] <= 1.0
    assert "loss/val" in probe.metrics[6] and "loss/val" in probe.metrics[12]
    assert [s for s, _ in trainer.val_history] == [6, 12]


def test_trainer_series_regression():
    """Series: float inputs, MSE task loss, no gates for the MLP."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(33 * 32, dtype=torch.float32).reshape(32, 33)
    x = torch.sin(t * 0.3 + torch.rand(32, 1, generator=g) * 6)
    data = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    for model in (AutoRegressiveModel(None, context=4, hidden=32), lfm(0).__class__(
            None, d_model=16, num_layers=1, num_experts=2, expert_dim=16, adapt_dim=8,
            adapt_rank=2)):
        trainer = Trainer(model, data, data, config(40)).fit()
        assert trainer.evaluate() < 0.5 * trainer.losses[0]


class NaNAfter:
    """Fills the first weight with NaN after step `at - 1`, so step `at` has a non-finite loss."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer, step, metrics):
        if step == self.at - 1:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(math.nan)


class NaNGrads:
    """Non-finite gradients at step `at`: its loss is finite, the update makes the weights NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_backward(self, trainer, step):
        if step == self.at:
            for p in trainer.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)


def test_divergence_in_the_last_update_stops_before_the_model_is_saved(regimes):
    """The last step's loss is finite but its update makes the weights NaN: no later loss would
    catch it, so the final validation loss does (else the stage saved a NaN model, exit 0)."""
    splits, _ = regimes
    trainer = Trainer(lfm(0), splits["train"], splits["val"], config(12, log_every=5),
                      [NaNGrads(12)])
    with pytest.raises(DivergenceError, match="non-finite validation loss \\(nan\\) at step 12"):
        trainer.fit()
    assert trainer.step == 12 and len(trainer.losses) == 12  # the last loss, finite, is kept
    assert all(math.isfinite(v) for v in trainer.losses)


def test_divergence_between_log_steps_stops_at_the_next_and_names_the_first(regimes, tmp_path):
    """Non-finite loss at step 23, log steps every 5: training stops at the log step 25 (no
    per-step host sync), the error names step 23, no checkpoint holds non-finite weights (the
    one due at step 24 is refused) and `losses` holds exactly the 22 finite steps."""
    splits, _ = regimes
    ckpt = Checkpointer(tmp_path, 8, "fp")
    trainer = Trainer(lfm(0), splits["train"], splits["val"], config(40, log_every=5),
                      [NaNAfter(23), ckpt])
    with pytest.raises(DivergenceError, match="at step 23") as err:
        trainer.fit()
    assert err.value.step == 23 and trainer.step == 24
    assert len(trainer.losses) == 22 and all(math.isfinite(v) for v in trainer.losses)
    state = load_state(tmp_path / "last.safetensors")
    assert state["trainer"]["step"] == 16
    assert all(bool(torch.isfinite(t).all()) for t in state["trainer"]["model"].values())
