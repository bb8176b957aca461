"""Chunked gated delta rule (Triton) against the token-by-token recurrence, over packed sequences."""
import importlib

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES

import kernels
from kernels.gated_delta_rule import (
    _chunked_torch, chunk_plan, gated_delta_rule_ref, gated_delta_rule_triton,
)

mod = importlib.import_module("kernels.gated_delta_rule")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
LENGTHS = [1, 63, 64, 65, 300]  # chunk boundaries (64) and a multi-chunk sequence


def make_inputs(lens, hk, hv, dk, dv, dtype, n_states=0, device=DEVICE):
    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    q = torch.randn(t, hk, dk, dtype=dtype, device=device)
    k = torch.randn(t, hk, dk, dtype=dtype, device=device)
    v = torch.randn(t, hv, dv, dtype=dtype, device=device)
    # Decays from none to strong, as A_log / dt_bias give them; beta in (0, 1).
    g = -torch.rand(t, hv, device=device) * torch.tensor([0.02, 3.0] * (hv // 2) + [0.5] * (hv % 2), device=device)
    beta = torch.rand(t, hv, dtype=dtype, device=device)
    extra = {}
    if n_states:
        extra["initial_state"] = torch.randn(n_states, hv, dk, dv, device=device) * 0.5
        extra["state_index"] = torch.randint(-1, n_states, (len(lens),), dtype=torch.int32, device=device)
    return (q, k, v, g, beta, cu), extra


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_chunked_kernel_matches_recurrence(dtype, poison, close):
    # GVA (2 value heads per key head), odd head dims, a shared initial state read by two sequences.
    args, extra = make_inputs(LENGTHS, 1, 2, 24, 40, dtype, n_states=2)
    extra["state_index"] = torch.tensor([0, -1, 1, 0, 1], dtype=torch.int32, device=DEVICE)
    out, final = gated_delta_rule_triton(*args, output_final_state=True, **extra)
    ref, ref_final = gated_delta_rule_ref(*args, output_final_state=True, **extra)
    assert out.dtype == dtype and out.shape == args[2].shape
    close(out, ref, TOL[dtype], name="o")
    close(final, ref_final, TOL[dtype], name="final state")


@pytest.mark.parametrize("chunk", [32, 64])
@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
def test_blocked_solve_every_chunk_fp32(chunk, with_state, poison, close):
    # The prepare kernel's blocked triangular solve (16 x 16 diagonal blocks merged by dots) at both
    # multi-block chunk sizes: ragged lengths ending inside every 16-row block of a chunk (and on its
    # edges), at fp32, so that the only error is the arithmetic's. Poisoned outputs catch unwritten rows.
    lens = [chunk + 17, 3, 16, chunk - 1, 2 * chunk + 33, 48, 1]
    args, extra = make_inputs(lens, 1, 2, 32, 16, torch.float32, n_states=2 if with_state else 0)
    if with_state:
        extra["state_index"] = torch.tensor([1, -1, 0, 0, 1, -1, 0], dtype=torch.int32, device=DEVICE)
    plan = chunk_plan(lens, DEVICE, chunk)
    out, final = gated_delta_rule_triton(*args, output_final_state=True, plan=plan, **extra)
    ref, ref_final = gated_delta_rule_ref(*args, output_final_state=True, **extra)
    assert not out.isnan().any() and not final.isnan().any()
    close(out, ref, TOL[torch.float32], name="o")
    close(final, ref_final, TOL[torch.float32], name="final state")


def test_short_sequences_small_chunk_no_state(poison, close):
    # Decode-like batches (every sequence <= 16 tokens) run 16-token chunks.
    lens = [1, 1, 5, 16]
    args, _ = make_inputs(lens, 2, 2, 16, 16, torch.float32)
    assert chunk_plan(lens).chunk == 16
    out, final = gated_delta_rule_triton(*args, scale=0.3, output_final_state=True)
    ref, ref_final = gated_delta_rule_ref(*args, scale=0.3, output_final_state=True)
    close(out, ref, TOL[torch.float32])
    close(final, ref_final, TOL[torch.float32])
    # Without the in-kernel L2 norm the caller keeps |k| ~ 1 (else the recurrence is unstable).
    q, k, v, g, beta, cu = args
    args = (q, k / k.norm(dim=-1, keepdim=True), v, g, beta, cu)
    out, none = gated_delta_rule_triton(*args, scale=0.3, use_qk_l2norm=False, plan=chunk_plan(lens, DEVICE, 32))
    assert none is None
    close(out, gated_delta_rule_ref(*args, scale=0.3, use_qk_l2norm=False)[0], TOL[torch.float32])


def test_torch_chunked_path_and_transformers_agree():
    """The CPU path (chunked, in torch) and transformers' own recurrence, per sequence."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    args, extra = make_inputs(LENGTHS, 2, 4, 16, 8, torch.float32, n_states=3, device="cpu")
    ref, ref_final = gated_delta_rule_ref(*args, output_final_state=True, **extra)
    out, final = _chunked_torch(*args, output_final_state=True, **extra)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(final, ref_final, atol=1e-5, rtol=1e-4)
    q, k, v, g, beta, cu = args
    cu = cu.tolist()
    for i in range(len(LENGTHS)):
        s = slice(cu[i], cu[i + 1])
        j = int(extra["state_index"][i])
        init = extra["initial_state"][j : j + 1] if j >= 0 else None
        o, st = torch_recurrent_gated_delta_rule(q[None, s], k[None, s], v[None, s], g[None, s], beta[None, s],
                                                 initial_state=init, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
        torch.testing.assert_close(o[0], ref[s], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(st[0], ref_final[i], atol=1e-5, rtol=1e-4)


def test_bad_inputs():
    args, _ = make_inputs([3], 2, 2, 16, 16, torch.float32)
    q, k, v, g, beta, cu = args
    with pytest.raises(ValueError, match="multiple of Hk"):
        gated_delta_rule_triton(q, k, v[:, :1].expand(-1, 3, -1).contiguous(), g, beta, cu)
    with pytest.raises(ValueError, match="state_index"):
        gated_delta_rule_triton(*args, initial_state=torch.zeros(1, 2, 16, 16, device=DEVICE))
    with pytest.raises(TypeError, match="initial_state"):
        gated_delta_rule_triton(*args, initial_state=torch.zeros(1, 2, 16, 16, dtype=torch.float16, device=DEVICE),
                                state_index=torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "gated_delta_rule_triton", lambda *a, **k: calls.append(1) or gated_delta_rule_triton(*a, **k))
    args, _ = make_inputs([2, 3], 1, 1, 16, 16, torch.float32)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    kernels.gated_delta_rule(*args)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    kernels.gated_delta_rule(*args, max_seqlen=3)
    assert calls == [1]
