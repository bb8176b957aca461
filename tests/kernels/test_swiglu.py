import importlib

import pytest
import torch
from kernel_helpers import DTYPES

import kernels
from kernels.swiglu import swiglu_ref, swiglu_triton

mod = importlib.import_module("kernels.swiglu")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", [(1, 9), (7, 41), (13, 341), (3, 1500), (130, 64)])
def test_matches_ref(dtype, shape, device, poison, close):
    t, inter = shape
    gate_up = 3 * torch.randn(t, 2 * inter, dtype=dtype, device=device)
    out = swiglu_triton(gate_up)
    assert out.shape == (t, inter) and out.dtype == dtype
    close(out, swiglu_ref(gate_up), *TOL[dtype])


def test_leading_dims_and_strided_rows(device, poison, close):
    big = torch.randn(2, 5, 90, dtype=torch.float16, device=device)
    gate_up = big[..., :82]  # [2, 5, 2*41], rows strided
    out = swiglu_triton(gate_up)
    assert out.shape == (2, 5, 41)
    close(out, swiglu_ref(gate_up), *TOL[torch.float16])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy exp
def test_extreme_gates(device, close):
    # silu must stay finite for large |gate| (exp overflow would give inf * 0).
    gate_up = torch.tensor([[-1e4, -50.0, 0.0, 50.0, 1e4, 2.0, 2.0, 2.0, 2.0, 2.0]], device=device)
    close(swiglu_triton(gate_up), swiglu_ref(gate_up), 1e-5, 1e-6)


def test_bad_inputs(device):
    with pytest.raises(ValueError, match="even"):
        swiglu_triton(torch.randn(3, 9, device=device))


def test_dispatch_uses_triton(monkeypatch, device):
    calls = []
    monkeypatch.setattr(mod, "swiglu_triton", lambda *a, **k: calls.append(1) or swiglu_triton(*a, **k))
    gate_up = torch.randn(4, 18, device=device)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    out = kernels.swiglu(gate_up)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = kernels.swiglu(gate_up)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
