"""The C++ CPU kernels (csrc/engine_cpu.cpp) against their torch references, and the fallback.

Tolerances (max abs error, plus the same relative term): fp32 1e-5, bf16 1e-2. Measured on
the grid below (AVX-512 build): attention fp32 <= 8e-7, bf16 <= 2e-3 (one bf16 ulp of the
output); the row-wise ops agree to fp32 rounding.

The extension must build here (CI has g++): a failed build fails ``test_extension_builds``
with the compiler's message rather than skipping the comparisons.
"""
import logging

import pytest
import torch

import kernels
from kernel_helpers import assert_close
from kernels import _csrc
from kernels.attention import varlen_attention_cpu, varlen_attention_ref
from kernels.layer_norm import layer_norm_ref
from kernels.pooling import mean_pool_ref
from kernels.rms_norm import rms_norm_ref
from kernels.swiglu import swiglu_ref

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LENS = [1, 2, 17, 127, 129, 1000]


@pytest.fixture(scope="module")
def ext():
    m = _csrc.module()
    assert m is not None, f"the C++ kernels failed to build: {_csrc._state['error']}"
    return m


def test_extension_builds(ext):
    assert ext.vec_size() in (8, 16) or torch.backends.cpu.get_cpu_capability() == "DEFAULT"


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "causal-prefix", "last-token", "last-token-prefix"])
def test_varlen_attention(ext, dtype, group, mode):
    g = torch.Generator().manual_seed(group)
    hkv, d = 2, 64
    hq = hkv * group
    cu = _cu(LENS)
    t = int(cu[-1])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    # q, k, v as strided views of one fused projection, as the models pass them
    qkv = rand(t, (hq + 2 * hkv) * d)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)
    cu_q, causal, kw = cu, mode != "bidirectional", {}
    if mode.startswith("last-token"):  # one query per sequence: its last row
        q = q[cu[1:].long() - 1]
        cu_q = torch.arange(len(LENS) + 1, dtype=torch.int32)
    if mode.endswith("prefix"):  # two prefix segments; one sequence has none
        kw = dict(prefix_k=rand(45, hkv, d), prefix_v=rand(45, hkv, d),
                  cu_seqlens_p=torch.tensor([0, 6, 45], dtype=torch.int32),
                  prefix_index=torch.tensor([0, 1, -1, 1, 0, 1], dtype=torch.int32))
    ref = varlen_attention_ref(q, k, v, cu_q, cu, causal=causal, scale=d ** -0.5, **kw)
    out = varlen_attention_cpu(ext, q, k, v, cu_q, cu, causal, d ** -0.5, **kw)
    assert out.dtype == dtype
    assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,hidden", [(1, 9), (17, 41), (129, 384), (3, 4231)])
def test_row_ops(ext, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    tol = dict(atol=TOL[dtype], rtol=TOL[dtype])
    x, r, w, b = rand(rows, hidden), rand(rows, hidden), rand(hidden), rand(hidden)
    for residual in (None, r):
        out, res = ext.rms_norm(x, residual, w, 1e-6, 1.0)
        ref, ref_res = rms_norm_ref(x, w, 1e-6, residual=residual, offset=1.0)
        assert_close(out, ref, name="rms_norm", **tol)
        if residual is not None:
            assert_close(res, ref_res, name="rms_norm residual", **tol)
        assert_close(ext.layer_norm(x, residual, w, b, 1e-12), layer_norm_ref(x, residual, w, b, 1e-12),
                     name="layer_norm", **tol)
    gu = rand(rows, 2 * hidden)
    assert_close(ext.swiglu(gu), swiglu_ref(gu), name="swiglu", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [False, True])
def test_mean_pool(ext, dtype, normalize):
    cu = _cu(LENS)
    h = torch.randn(int(cu[-1]), 384, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = ext.mean_pool(h, cu, normalize)
    assert out.dtype == torch.float32
    assert_close(out, mean_pool_ref(h, cu, normalize), atol=1e-5, rtol=1e-5)


def test_ops_dispatch_to_the_extension_unless_forced_to_torch(monkeypatch):
    # A stand-in extension records what the ops call; ENGINE_KERNELS=torch must bypass it.
    calls = []

    class Spy:
        def layer_norm(self, x, residual, w, b, eps):
            calls.append("layer_norm")
            return torch.full_like(x, 3.0)

    x, w, b = torch.randn(4, 8), torch.ones(8), torch.zeros(8)
    monkeypatch.setitem(_csrc._state, "tried", True)
    monkeypatch.setitem(_csrc._state, "module", Spy())
    monkeypatch.setenv("ENGINE_KERNELS", "auto")
    assert torch.equal(kernels.layer_norm(x, w, b, 1e-5), torch.full_like(x, 3.0))
    assert calls == ["layer_norm"]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    assert torch.allclose(kernels.layer_norm(x, w, b, 1e-5), layer_norm_ref(x, None, w, b, 1e-5))
    assert calls == ["layer_norm"]


def test_disabled_extension_falls_back_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setenv("ENGINE_CSRC", "0")
    monkeypatch.setenv("ENGINE_KERNELS", "auto")
    saved = dict(_csrc._state)
    _csrc.reset()
    try:
        with caplog.at_level(logging.INFO, logger="engine"):
            x, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)
            out = kernels.layer_norm(x, w, b, 1e-5)
            kernels.layer_norm(x, w, b, 1e-5)
            assert not kernels.csrc_available()
        assert torch.equal(out, layer_norm_ref(x, None, w, b, 1e-5))
        lines = [r for r in caplog.records if "C++ CPU kernels" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
    finally:
        _csrc._state.update(saved)


def test_failed_build_falls_back(monkeypatch, caplog):
    monkeypatch.setenv("ENGINE_KERNELS", "auto")
    monkeypatch.setattr(_csrc, "_build", lambda: (_ for _ in ()).throw(RuntimeError("no compiler here")))
    saved = dict(_csrc._state)
    _csrc.reset()
    try:
        with caplog.at_level(logging.INFO, logger="engine"):
            gu = torch.randn(3, 10)
            assert torch.equal(kernels.swiglu(gu), swiglu_ref(gu))
        assert any("no compiler here" in r.getMessage() for r in caplog.records)
    finally:
        _csrc._state.update(saved)
