"""Both models on a GPU (issue 12): the batched LFModel equals the CPU reference, every tensor
of a forward/backward stays on the device, and with deterministic algorithms two identical
steps give identical gradients. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import os

import pytest
import torch
from test_models import CASES, IDS, SIZES, V, inputs, loss_and_grads, make, pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def exact_cuda():
    """fp32 matmuls without TF32, deterministic kernels (cuBLAS needs its workspace setting)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2])
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


@pytest.mark.parametrize("sizes", SIZES, ids=["rank2", "rank0"])
def test_cuda_batched_lfm_equals_cpu_reference(sizes):
    new, ref = pair(V, sizes)
    x = inputs(V, 4, 13, seed=3)
    y = torch.randn(4, 13, V, generator=torch.Generator().manual_seed(4))
    out1, gates1, grads1 = loss_and_grads(new.cuda().train(), x.cuda(), y.cuda())
    out0, gates0, grads0 = loss_and_grads(ref.train(), x, y)
    torch.testing.assert_close(out1.cpu(), out0, rtol=1e-4, atol=1e-4)
    for g1, g0 in zip(gates1, gates0, strict=True):
        torch.testing.assert_close(g1.cpu(), g0, rtol=1e-4, atol=1e-4)
    for name, g0 in grads0.items():
        torch.testing.assert_close(grads1[name].cpu(), g0, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize(("arch", "vocab"), CASES, ids=IDS)
def test_cuda_everything_stays_on_the_device_and_is_deterministic(arch, vocab):
    model = make(arch, vocab).cuda().train()
    x = inputs(vocab).cuda()
    grads = []
    for _ in range(2):
        out, gates = model(x, return_gates=True)
        assert out.is_cuda and all(g.is_cuda for g in gates)
        model.zero_grad(set_to_none=True)
        out.square().mean().backward()
        assert all(p.grad.is_cuda for p in model.parameters())
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # eval: the cached token-mixing kernel lives on the device too
        model.eval()
        first = model(x)
        assert torch.equal(model(x), first) and first.is_cuda
