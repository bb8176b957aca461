"""int8 linear with per-row activations: the C++ kernels against the torch reference, the codes
exact, the result per row (batch-invariant, bitwise), and the int8 error against fp32 bounded."""
import pytest
import torch

import kernels
from kernels import _csrc
from kernels.int8_linear import (dequantize_rows_ref, int8_linear_ref, int8_mm, prepare_int8_weight,
                                 quantize_rows_ref)

SHAPES = [(1, 384, 1536), (9, 33, 7), (41, 341, 96), (64, 1536, 384)]
ACTS = [None, "gelu", "gelu_tanh"]


def _case(t, k, n, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed * 1000 + t + k + n)
    x = torch.randn(t, k, generator=g) * 2
    if outliers:  # a few channels far larger, as LayerNorm outputs have
        x[:, torch.randint(0, k, (max(1, k // 50),), generator=g)] *= 30
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    return x, w, b, x.abs().amax(0) + 1.0


@pytest.fixture(scope="module")
def ext():
    module = _csrc.module()
    if module is None:
        pytest.skip("the C++ kernels did not build here (the reference is tested below regardless)")
    return module


@pytest.mark.parametrize("t,k,n", SHAPES)
def test_quantized_codes_equal_the_reference(ext, t, k, n):
    x, _, _, act_max = _case(t, k, n)
    inv = 1.0 / act_max
    for inv_smooth in (None, inv):
        q1, s1, z1 = quantize_rows_ref(x, inv_smooth)
        q2, s2, z2 = ext.quantize_rows(x, inv_smooth)
        assert q2.dtype == torch.int8 and z2.dtype == torch.int32
        assert torch.equal(q1, q2) and torch.equal(z1, z2) and torch.equal(s1, s2)
        assert int(q2.min()) >= -128 and int(q2.max()) <= 127
        # The codes reconstruct x to half a step, and 0 is exact.
        rec = s1[:, None] * (q1.float() - z1[:, None].float())
        xs = x if inv_smooth is None else x * inv_smooth
        assert float(((rec - xs).abs() / s1[:, None]).max()) <= 0.5 + 1e-3


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_cpp_equals_reference_and_is_close_to_fp32(ext, t, k, n, act):
    x, w, b, act_max = _case(t, k, n)
    smooth = act_max.sqrt() / w.abs().amax(0).clamp_min(1e-5).sqrt()
    wq_t, w_scale, w_sum = prepare_int8_weight(w, smooth)
    code = {None: 0, "gelu": 1, "gelu_tanh": 2}[act]
    ref = int8_linear_ref(x, wq_t, w_scale, w_sum, b, 1.0 / smooth, code)
    got = kernels.int8_linear(x, wq_t, w_scale, w_sum, b, 1.0 / smooth, act)
    assert got.dtype == torch.float32 and got.shape == (t, n) and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # multiply-adds may fuse in C++
    fp = torch.nn.functional.linear(x, w, b)
    if act:
        fp = torch.nn.functional.gelu(fp, approximate="tanh" if act == "gelu_tanh" else "none")
    assert float((got - fp).abs().max() / fp.abs().max()) < 0.03


@pytest.mark.parametrize("path", ["reference", "csrc"])
def test_each_row_is_independent_of_its_batch(path, monkeypatch):
    if path == "csrc" and _csrc.module() is None:
        pytest.skip("the C++ kernels did not build here")
    if path == "reference":
        monkeypatch.setenv("ENGINE_KERNELS", "torch")
    x, w, b, act_max = _case(64, 384, 1536)
    x[7] *= 1000  # an outlier-heavy neighbour changes nothing for the others
    wq_t, w_scale, w_sum = prepare_int8_weight(w, act_max.sqrt())
    batch = kernels.int8_linear(x, wq_t, w_scale, w_sum, b, 1.0 / act_max.sqrt(), "gelu")
    for i in (0, 5, 63):
        alone = kernels.int8_linear(x[i:i + 1], wq_t, w_scale, w_sum, b, 1.0 / act_max.sqrt(), "gelu")
        assert torch.equal(alone[0], batch[i])


def test_int32_gemm_is_exact_and_dequantization_matches_by_hand():
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (13, 70), dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (29, 70), dtype=torch.int8, generator=g)
    acc = int8_mm(q, wq.t())
    assert torch.equal(acc.long(), q.long() @ wq.long().t())
    scale, zero = torch.rand(13) + 0.1, torch.randint(-128, 128, (13,), dtype=torch.int32, generator=g)
    w_scale, w_sum = torch.rand(29) + 0.1, wq.to(torch.int32).sum(1)
    y = dequantize_rows_ref(acc, scale, zero, w_sum, w_scale, None, 0)
    by_hand = (((q.double() - zero[:, None].double()) * scale[:, None].double())
               @ (wq.double() * w_scale[:, None].double()).t())
    torch.testing.assert_close(y.double(), by_hand, rtol=1e-5, atol=1e-4)


def test_bad_activation_is_named():
    x, w, b, _ = _case(2, 8, 4)
    wq_t, w_scale, w_sum = prepare_int8_weight(w)
    with pytest.raises(ValueError, match="activation must be one of"):
        kernels.int8_linear(x, wq_t, w_scale, w_sum, b, None, "relu")


def test_uint8_codes_are_the_int8_codes_plus_128(ext):
    x, _, _, act_max = _case(41, 341, 96)
    q, s, z = ext.quantize_rows(x, 1.0 / act_max)
    u, su, zu = ext.quantize_rows(x, 1.0 / act_max, True)
    assert u.dtype == torch.uint8 and torch.equal(s, su)
    assert torch.equal(u.long(), q.long() + 128) and torch.equal(zu, z + 128)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("t,k,n", SHAPES)
def test_onednn_gemm_equals_int_mm_bitwise(ext, t, k, n, act):
    """oneDNN's u8s8 GEMM (AMX or VNNI) writes the exact int32 sums as fp32; below 2^24 (every layer
    of these shapes) the result is bitwise that of the torch._int_mm path, and batch-invariant."""
    if not kernels.onednn_int8_available():
        pytest.skip("this torch has no oneDNN quantized linear")
    x, w, b, act_max = _case(t, k, n)
    x[0] *= 1000  # an outlier-heavy row
    inv = 1.0 / act_max.sqrt()
    wq_t, w_scale, w_sum = prepare_int8_weight(w, act_max.sqrt())
    packed = kernels.pack_int8_weight(wq_t)
    want = kernels.int8_linear(x, wq_t, w_scale, w_sum, b, inv, act)
    got = kernels.int8_linear_packed(x, packed, w_scale, w_sum, b, inv, act)
    assert torch.equal(got, want)
    for i in {0, t // 2, t - 1}:
        assert torch.equal(kernels.int8_linear_packed(x[i:i + 1], packed, w_scale, w_sum, b, inv, act)[0], got[i])
    padded = kernels.int8_linear_packed(x, packed, w_scale, w_sum, b, inv, act, rows=t + 13)  # a row bucket
    assert padded.shape == (t, n) and torch.equal(padded, got)
    bf16 = kernels.int8_linear_packed(x, packed, w_scale, w_sum, b, inv, act, rows=t + 13, out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.view(torch.int16), got.to(torch.bfloat16).view(torch.int16))  # the cast's bits


def test_dequantize_to_bf16_rounds_as_torch(ext):
    """The dequantization's bf16 output has the bits of torch's fp32 -> bf16 cast, on values chosen for the
    rounding: ties to even both ways, values just off a tie, subnormals, the largest finite, inf, NaN."""
    special = [1.00390625, 1.01171875, -1.00390625, 1.0039063, 1.0039062, 1e-40, -3e-39, 1.2e-38, 3.4028235e38,
               -3.39e38, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 65504.0, 7.0e-46]
    g = torch.Generator().manual_seed(7)
    for n in (len(special), 16, 35):  # the vector body and the scalar tail
        acc = torch.cat((torch.tensor(special), torch.randn(3 * n, generator=g) * 100))[:2 * n].view(2, n)
        ones, zeros = torch.ones(2), torch.zeros(2, dtype=torch.int32)
        got = ext.dequantize_rows(acc, ones, zeros, torch.zeros(n, dtype=torch.int32), torch.ones(n), None, 0, True)
        want = ext.dequantize_rows(acc, ones, zeros, torch.zeros(n, dtype=torch.int32), torch.ones(n), None, 0)
        assert torch.equal(want.view(torch.int32), acc.view(torch.int32))  # unit scales: y is acc itself
        assert torch.equal(got.view(torch.int16), acc.to(torch.bfloat16).view(torch.int16))
