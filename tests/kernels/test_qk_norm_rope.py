import importlib

import pytest
import torch
from kernel_helpers import DTYPES

import kernels
from kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton, rope_cos_sin

mod = importlib.import_module("kernels.qk_norm_rope")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(t, hq, hkv, d, dtype, device, norm, pad=0):
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(t, width + pad, dtype=dtype, device=device)[:, :width]  # pad>0: strided rows
    positions = torch.randint(0, 40000, (t,), device=device)
    cos, sin = rope_cos_sin(positions, d, 1e6)
    qw = torch.randn(d, dtype=dtype, device=device) if norm else None
    kw = torch.randn(d, dtype=dtype, device=device) if norm else None
    return qkv, qw, kw, cos, sin


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("heads", [(2, 2, 32), (4, 2, 64), (16, 8, 128), (3, 1, 256), (5, 1, 18)])
@pytest.mark.parametrize("norm", [True, False])
def test_matches_ref(dtype, heads, norm, device, close):
    hq, hkv, d = heads
    qkv, qw, kw, cos, sin = _inputs(19, hq, hkv, d, dtype, device, norm)
    mine, ref = qkv.clone(), qkv.clone()
    q, k, v = qk_norm_rope_triton(mine, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    rq, rk, rv = qk_norm_rope_ref(ref, qw, kw, cos, sin, hq, hkv, d, 1e-6)
    for name, a, b in (("q", q, rq), ("k", k, rk), ("v", v, rv)):
        assert a.shape == b.shape and a.stride() == b.stride(), name
        assert a.data_ptr() - mine.data_ptr() == b.data_ptr() - ref.data_ptr(), f"{name} is not the same view"
    close(mine, ref, *TOL[dtype], name="qkv")
    assert torch.equal(v, qkv.view(19, hq + 2 * hkv, d)[:, hq + hkv:]), "v must be untouched"


def test_strided_rows_in_place(device, close):
    qkv, qw, kw, cos, sin = _inputs(7, 4, 2, 64, torch.float16, device, True, pad=24)
    base = qkv._base
    before = base.clone()
    ref = qkv.clone()
    qk_norm_rope_triton(qkv, qw, kw, cos, sin, 4, 2, 64, 1e-6)
    qk_norm_rope_ref(ref, qw, kw, cos, sin, 4, 2, 64, 1e-6)
    close(qkv, ref, *TOL[torch.float16])
    assert torch.equal(base[:, 512:], before[:, 512:]), "padding columns were written"


def test_empty_and_bad_inputs(device):
    qkv, qw, kw, cos, sin = _inputs(0, 2, 1, 32, torch.float32, device, True)
    q, k, v = qk_norm_rope_triton(qkv, qw, kw, cos, sin, 2, 1, 32, 1e-6)
    assert q.shape == (0, 2, 32)
    qkv, qw, kw, cos, sin = _inputs(3, 2, 1, 32, torch.float32, device, True)
    with pytest.raises(ValueError, match="columns"):
        qk_norm_rope_triton(qkv, qw, kw, cos, sin, 2, 2, 32, 1e-6)
    with pytest.raises(ValueError, match="both"):
        qk_norm_rope_triton(qkv, qw, None, cos, sin, 2, 1, 32, 1e-6)
    with pytest.raises(ValueError, match="cos"):
        qk_norm_rope_triton(qkv, qw, kw, cos[:, :8], sin, 2, 1, 32, 1e-6)


def test_dispatch_uses_triton(monkeypatch, device):
    calls = []
    monkeypatch.setattr(mod, "qk_norm_rope_triton", lambda *a, **k: calls.append(1) or qk_norm_rope_triton(*a, **k))
    qkv, qw, kw, cos, sin = _inputs(5, 4, 2, 32, torch.float32, device, True)
    a, b = qkv.clone(), qkv.clone()
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    kernels.qk_norm_rope(a, qw, kw, cos, sin, 4, 2, 32, 1e-6)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    kernels.qk_norm_rope(b, qw, kw, cos, sin, 4, 2, 32, 1e-6)
    assert calls == [1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
