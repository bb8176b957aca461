import importlib

import pytest
import torch
from kernel_helpers import DTYPES

import kernels
from kernels.yes_no_head import yes_no_head_ref, yes_no_head_triton

mod = importlib.import_module("kernels.yes_no_head")


def _inputs(n_tokens, hidden, dtype, device, residual):
    h = torch.randn(n_tokens, hidden, dtype=dtype, device=device)
    r = torch.randn_like(h) if residual else None
    norm_w = torch.randn(hidden, dtype=dtype, device=device)
    w = torch.randn(hidden, dtype=torch.float32, device=device) / hidden**0.5
    return h, r, norm_w, w


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("hidden", [9, 41, 341, 1024])
@pytest.mark.parametrize("residual,offset", [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_matches_ref(dtype, hidden, residual, offset, device, poison, close):
    h, r, norm_w, w = _inputs(50, hidden, dtype, device, residual)
    # ragged last-token indices, a repeat, the first and the last row
    last = torch.tensor([0, 16, 17, 49, 17, 30], device=device)
    logit, score = yes_no_head_triton(h, last, norm_w, w, 1e-6, residual=r, offset=offset)
    ref_logit, ref_score = yes_no_head_ref(h, last, norm_w, w, 1e-6, residual=r, offset=offset)
    assert logit.dtype == score.dtype == torch.float32 and logit.shape == (6,)
    # inputs are exact in every dtype; only fp32 summation order differs
    close(logit, ref_logit, 2e-5, 1e-5, name="logit")
    close(score, ref_score, 1e-5, 1e-5, name="score")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy exp
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes_and_saturation(index_dtype, device, close):
    h, _, norm_w, w = _inputs(20, 64, torch.float16, device, False)
    w = w * 200  # large logits: fp32 sigmoid must stay below 1.0 where it can
    last = torch.tensor([3, 19, 7], dtype=index_dtype, device=device)
    logit, score = yes_no_head_triton(h, last, norm_w, w, 1e-6)
    ref_logit, ref_score = yes_no_head_ref(h, last, norm_w, w, 1e-6)
    close(logit, ref_logit, 1e-3, 1e-5, name="logit")
    close(score, ref_score, 1e-6, 1e-5, name="score")


def test_empty_selection(device):
    h, _, norm_w, w = _inputs(5, 16, torch.float32, device, False)
    logit, score = yes_no_head_triton(h, torch.empty(0, dtype=torch.int64, device=device), norm_w, w, 1e-6)
    assert logit.shape == score.shape == (0,)


def test_out_of_range_rows_score_nan_and_read_nothing(device):
    h, _, norm_w, w = _inputs(5, 16, torch.float32, device, False)
    last = torch.tensor([4, 5, -5, -6, 2], device=device)  # 5 and -6 fall outside the 5 rows
    logit, score = yes_no_head_triton(h, last, norm_w, w, 1e-6)
    bad = torch.tensor([False, True, False, True, False])
    assert torch.isnan(logit.cpu()[bad]).all() and torch.isnan(score.cpu()[bad]).all()
    ref_logit, _ = yes_no_head_ref(h, last[~bad.to(last.device)], norm_w, w, 1e-6)
    torch.testing.assert_close(logit[~bad.to(logit.device)], ref_logit, atol=1e-5, rtol=1e-5)


def test_bad_inputs(device):
    h, _, norm_w, w = _inputs(5, 16, torch.float32, device, False)
    with pytest.raises(ValueError, match="must be"):
        yes_no_head_triton(h, torch.tensor([1], device=device), norm_w[:8], w, 1e-6)
    with pytest.raises(TypeError, match="last_index"):
        yes_no_head_triton(h, torch.tensor([1.0], device=device), norm_w, w, 1e-6)


def test_dispatch_uses_triton(monkeypatch, device):
    calls = []
    monkeypatch.setattr(mod, "yes_no_head_triton", lambda *a, **k: calls.append(1) or yes_no_head_triton(*a, **k))
    h, r, norm_w, w = _inputs(12, 41, torch.float32, device, True)
    last = torch.tensor([2, 11], device=device)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    out = kernels.yes_no_head(h, last, norm_w, w, 1e-6, residual=r, offset=1.0)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = kernels.yes_no_head(h, last, norm_w, w, 1e-6, residual=r, offset=1.0)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
