import importlib

import pytest
import torch
from kernel_helpers import DTYPES

import kernels
from kernels.rms_norm import rms_norm_ref, rms_norm_triton

mod = importlib.import_module("kernels.rms_norm")  # the package re-exports a function of the same name
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", [(1, 9), (7, 41), (33, 341), (5, 1024), (3, 4231)])
@pytest.mark.parametrize("residual,offset", [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_matches_ref(dtype, shape, residual, offset, device, poison, close):
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    r = torch.randn_like(x) if residual else None
    out, res = rms_norm_triton(x, w, 1e-6, residual=r, offset=offset)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-6, residual=r, offset=offset)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    close(out, ref_out, atol, rtol)
    if residual:
        assert res.dtype == dtype
        close(res, ref_res, 0.0, 0.0, name="x + residual")  # one rounding, bit exact
    else:
        assert res is None


def test_leading_dims_strided_rows_and_fp32_weight(device, poison, close):
    # [B, T, H] input whose rows are a strided view; weight kept in fp32.
    big = torch.randn(2, 6, 80, dtype=torch.float16, device=device)
    x = big[..., :77]
    r = torch.randn(2, 6, 77, dtype=torch.float16, device=device)
    w = torch.randn(77, dtype=torch.float32, device=device)
    out, res = rms_norm_triton(x, w, 1e-5, residual=r)
    ref_out, ref_res = rms_norm_ref(x, w, 1e-5, residual=r)
    assert out.shape == x.shape and res.shape == x.shape
    close(out, ref_out, *TOL[torch.float16])
    close(res, ref_res, 0.0)


def test_empty_input(device):
    x = torch.randn(0, 64, device=device)
    out, res = rms_norm_triton(x, torch.ones(64, device=device), 1e-6, residual=torch.randn(0, 64, device=device))
    assert out.shape == (0, 64) and res.shape == (0, 64)


def test_bad_inputs(device):
    x = torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm_triton(x, torch.ones(15, device=device), 1e-6)
    with pytest.raises(TypeError, match="residual"):
        rms_norm_triton(x, torch.ones(16, device=device), 1e-6, residual=x.half())


def test_dispatch_uses_triton(monkeypatch, device):
    calls = []
    monkeypatch.setattr(mod, "rms_norm_triton", lambda *a, **k: calls.append(1) or rms_norm_triton(*a, **k))
    x = torch.randn(3, 41, device=device)
    w = torch.randn(41, device=device)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    out, _ = kernels.rms_norm(x, w, 1e-6, offset=1.0)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref, _ = kernels.rms_norm(x, w, 1e-6, offset=1.0)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
