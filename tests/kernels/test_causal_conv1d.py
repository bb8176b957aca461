"""Causal depthwise conv1d over packed sequences (Triton) against a per-sequence F.conv1d."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, DTYPES

import kernels
from kernels.causal_conv1d import causal_conv1d_ref, causal_conv1d_triton

mod = importlib.import_module("kernels.causal_conv1d")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1e-2)}
LENGTHS = [1, 2, 3, 4, 63, 64, 65, 300]  # shorter than the kernel width, and chunk-sized


def per_sequence(x, w, cu, bias, states, index, silu=True):
    """transformers' formulation, one sequence at a time: conv1d over [state ; x]."""
    chans, k = w.shape
    outs, finals = [], []
    cu = cu.tolist()
    for i in range(len(cu) - 1):
        j = -1 if index is None else int(index[i])
        st = states[j].float() if j >= 0 else torch.zeros(chans, k - 1, device=x.device)
        full = torch.cat([st, x[cu[i] : cu[i + 1]].float().T], dim=1)[None]
        o = F.conv1d(full, w.float()[:, None], None if bias is None else bias.float(), groups=chans)[0].T
        outs.append(F.silu(o) if silu else o)
        finals.append(full[0, :, -(k - 1):])
    return torch.cat(outs), torch.stack(finals)


def packed(lens, chans, dtype, width=4, n_states=2, device=DEVICE):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    x = torch.randn(sum(lens), chans + 5, dtype=dtype, device=device)[:, :chans]  # strided rows
    w = torch.randn(chans, width, dtype=dtype, device=device)
    states = torch.randn(n_states, chans, width - 1, dtype=dtype, device=device)
    index = torch.randint(-1, n_states, (len(lens),), dtype=torch.int32, device=device)
    return x, w, cu, states, index


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_per_sequence_conv(dtype, with_state, poison, close):
    x, w, cu, states, index = packed(LENGTHS, 200, dtype)  # 200 channels: two channel blocks, a partial one
    kw = dict(initial_state=states, state_index=index) if with_state else {}
    out, final = causal_conv1d_triton(x, w, cu, output_final_state=True, **kw)
    want, want_final = per_sequence(x, w, cu, None, states if with_state else None, index if with_state else None)
    close(out, want, *TOL[dtype])
    close(final, want_final, *TOL[dtype], name="final state")
    ref, ref_final = causal_conv1d_ref(x, w, cu, output_final_state=True, **kw)
    close(ref, want, *TOL[dtype], name="reference")
    close(ref_final, want_final, *TOL[dtype], name="reference final state")


def test_bias_no_activation_width_two(poison, close):
    x, w, cu, states, index = packed([5, 1, 17], 33, torch.float32, width=2)
    bias = torch.randn(33, device=DEVICE)
    out, final = causal_conv1d_triton(x, w, cu, bias=bias, initial_state=states, state_index=index, activation=None)
    assert final is None
    want, _ = per_sequence(x, w, cu, bias, states, index, silu=False)
    close(out, want, *TOL[torch.float32])
    close(causal_conv1d_ref(x, w, cu, bias=bias, initial_state=states, state_index=index, activation=None)[0],
          want, *TOL[torch.float32])


def test_bad_inputs():
    x, w, cu, states, index = packed([3, 4], 16, torch.float32)
    with pytest.raises(ValueError, match="state_index"):
        causal_conv1d_triton(x, w, cu, initial_state=states)
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d_triton(x, w, cu, initial_state=states[:, :, :2], state_index=index)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(x, w, cu, activation="gelu")


def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "causal_conv1d_triton", lambda *a, **k: calls.append(1) or causal_conv1d_triton(*a, **k))
    x, w, cu, _, _ = packed([3, 4], 16, torch.float32)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    kernels.causal_conv1d(x, w, cu)
    assert calls == [1]
