"""lfmodel.optim: the Trainer's Adam and clipping give torch's numbers bit for bit."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lfmodel.optim import Adam, clip_grad_norm_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def params(device: str, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 6), (1,)]
    return [nn.Parameter(torch.randn(*s, generator=g).to(device)) for s in shapes]


def grads(ps: list[nn.Parameter], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.device) for p in ps]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_steps_as_torch_fused_adam(device, weight_decay):
    """Parameters and moments equal torch's fused Adam's after every step: the direct step (one
    shared step counter), a changed lr, a state_dict round trip into a fresh optimizer, and a
    step where one parameter has no gradient (torch's step from then on: its counter lags)."""
    ours, theirs = params(device), params(device)
    opt = Adam(ours, lr=0.01, weight_decay=weight_decay)
    ref = torch.optim.Adam(theirs, lr=0.01, weight_decay=weight_decay, fused=True)

    def step(i: int, skip: int | None = None) -> None:
        for side in (ours, theirs):
            for j, (p, g) in enumerate(zip(side, grads(side, i), strict=True)):
                p.grad = None if j == skip else g.clone()
        opt.step()
        ref.step()
        assert same(ours, theirs), f"parameters differ after step {i}"
        for p, q in zip(ours, theirs, strict=True):
            a, b = opt.state[p], ref.state[q]
            assert torch.equal(a["exp_avg"], b["exp_avg"])
            assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
            assert a["step"].item() == b["step"].item()

    def shared() -> bool:
        return len({id(opt.state[p]["step"]) for p in ours}) == 1

    for i in range(1, 4):
        step(i)
    assert shared(), "the direct step was not taken"
    for group in (*opt.param_groups, *ref.param_groups):
        group["lr"] = 0.003
    step(4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt = Adam(ours, lr=0.003, weight_decay=weight_decay)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    step(5)
    assert shared(), "no direct step after a load"
    step(6, skip=1)  # no gradient for one parameter: torch's step, its counter stays behind
    step(7)
    assert not shared()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [1e-2, 1e3])  # scaled down, and left as they are
def test_clip_grad_norm_equals_torchs_foreach_clipping(device, max_norm):
    ours, theirs = params(device), params(device)
    for side in (ours, theirs):
        for p, g in zip(side, grads(side, 0), strict=True):
            p.grad = g
    ours[2].grad = None  # a parameter without a gradient is left out, as torch leaves it
    theirs[2].grad = None
    norm = clip_grad_norm_(ours, max_norm)
    expected = nn.utils.clip_grad_norm_(theirs, max_norm, foreach=True)
    assert torch.equal(norm, expected)
    assert same([p.grad for p in ours if p.grad is not None],
                [p.grad for p in theirs if p.grad is not None])
    if max_norm < norm:
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours if
                                                    p.grad is not None]))
        torch.testing.assert_close(total.item(), max_norm, rtol=1e-4, atol=0)
