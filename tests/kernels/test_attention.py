import importlib

import pytest
import torch
from kernel_helpers import DTYPES

import kernels
from kernels.attention import build_schedule, varlen_attention_ref, varlen_attention_triton

mod = importlib.import_module("kernels.attention")
# fp32 runs exactly in the interpreter; compiled fp32 dots use IEEE precision.
# Low-precision outputs are compared with the reference on upcast inputs.
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}

# Ragged lengths: 1, 2, odd, around a power of two, and longer than a block.
LENS = [1, 2, 17, 127, 129, 40]


def _cu(lens, device):
    return torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)


def _case(lens_q, lens_k, hq, hkv, d, dtype, device, prefix=None):
    """Random packed inputs; prefix = (segment lengths, prefix_index) or None."""
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, device=device)
    k = torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype, device=device)
    v = torch.randn_like(k)
    extra = {}
    if prefix is not None:
        seg_lens, index = prefix
        cu_p = _cu(seg_lens, device)
        extra = dict(
            prefix_k=torch.randn(int(cu_p[-1]), hkv, d, dtype=dtype, device=device),
            prefix_v=torch.randn(int(cu_p[-1]), hkv, d, dtype=dtype, device=device),
            cu_seqlens_p=cu_p, prefix_index=torch.tensor(index, dtype=torch.int32, device=device),
        )
    return (q, k, v, cu_q, cu_k), extra


def _ref(args, extra, causal, scale):
    # Reference in fp32 on the same (upcast) inputs.
    q, k, v, cu_q, cu_k = args
    up = {n: (t.float() if t.is_floating_point() else t) for n, t in extra.items()}
    return varlen_attention_ref(q.float(), k.float(), v.float(), cu_q, cu_k, causal=causal, scale=scale, **up)


def _check(args, extra, causal, dtype, close, scale=None, **kw):
    d = args[0].shape[-1]
    scale = d**-0.5 if scale is None else scale
    out = varlen_attention_triton(*args, causal=causal, scale=scale, **extra, **kw)
    assert out.dtype == dtype and out.shape == args[0].shape
    close(out, _ref(args, extra, causal, scale), TOL[dtype])
    return out


# Shared prefix: sequences 0, 2, 5 share segment 1, sequence 3 uses segment 0
# (33 = one past a block), sequence 4 the one-token segment 3, sequence 1 none;
# segment 2 is empty.
PREFIX = ([33, 70, 0, 1], [1, -1, 1, 0, 3, 1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("heads", [(2, 2, 64), (4, 2, 128), (4, 1, 32)], ids=lambda h: "hq%d-hkv%d-d%d" % h)
@pytest.mark.parametrize("prefix", [False, True], ids=["noprefix", "prefix"])
def test_matches_ref(dtype, causal, heads, prefix, device, poison, close):
    hq, hkv, d = heads
    args, extra = _case(LENS, LENS, hq, hkv, d, dtype, device, PREFIX if prefix else None)
    _check(args, extra, causal, dtype, close)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_head_dim_256_and_odd(causal, device, poison, close):
    for d in (256, 80):
        args, extra = _case([5, 33, 64], [5, 33, 64], 2, 1, d, torch.float16, device, ([9], [0, -1, 0]))
        _check(args, extra, causal, torch.float16, close)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_more_keys_than_queries(causal, device, poison, close):
    # Bottom-right causal alignment: the last query sees every key. The offsets
    # Lk - Lq sweep the residues around the 32-key blocks, so the split between
    # unmasked and diagonal blocks is hit on both sides of each boundary.
    diags = [0, 1, 2, 15, 16, 30, 31, 32, 33, 63, 64, 95]
    lens_q = [1, 17] + [40] * len(diags)
    lens_k = [9, 17] + [40 + d for d in diags]
    args, extra = _case(lens_q, lens_k, 2, 1, 32, torch.float32, device)
    _check(args, extra, causal, torch.float32, close)


def test_fewer_keys_than_queries(device, poison, close):
    # Causal rows before the first visible key see nothing: 0, as SDPA gives.
    args, extra = _case([20, 5], [7, 5], 2, 1, 32, torch.float32, device)
    out = _check(args, extra, True, torch.float32, close)
    assert torch.all(out[:13] == 0)


@pytest.mark.parametrize("config", [
    dict(block_m=64, block_n=32, pack=4),   # 4 heads of a KV head in one 16-token block
    dict(block_m=32, block_n=64, pack=1),   # no head packing, BLOCK_N > BLOCK_M
    dict(block_m=128, block_n=64),          # the GPU tiles for d=128 (pack 4: 32 tokens per block)
    dict(block_m=64, block_n=32, use_desc=True),  # tensor-descriptor (TMA) loads
], ids=["pack4", "pack1", "gpu-tiles", "desc"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_tile_configs(config, causal, device, poison, close):
    lens = [1, 2, 17, 129, 300]
    args, extra = _case(lens, lens, 8, 2, 64, torch.float16, device, ([64, 5], [0, 0, -1, 1, 0]))
    _check(args, extra, causal, torch.float16, close, **config)


def test_views_of_packed_qkv(device, poison, close):
    # The engine passes q/k/v as strided views of one [T, (Hq+2Hkv)*D] buffer.
    hq, hkv, d = 4, 2, 64
    cu = _cu(LENS, device)
    qkv = torch.randn(int(cu[-1]), (hq + 2 * hkv) * d, dtype=torch.float16, device=device)
    view = qkv.view(-1, hq + 2 * hkv, d)
    q, k, v = view[:, :hq], view[:, hq:hq + hkv], view[:, hq + hkv:]
    for use_desc in (False, True):
        _check((q, k, v, cu, cu), {}, True, torch.float16, close, use_desc=use_desc)


def test_int64_metadata_max_seqlen_and_scale(device, poison, close):
    args, extra = _case(LENS, LENS, 2, 1, 32, torch.float32, device, PREFIX)
    q, k, v, cu_q, cu_k = args
    extra = {n: (t.long() if n in ("cu_seqlens_p", "prefix_index") else t) for n, t in extra.items()}
    args = (q, k, v, cu_q.long(), cu_k.long())
    _check(args, extra, True, torch.float32, close, scale=0.3, max_seqlen_q=max(LENS), max_seqlen_k=max(LENS))


def test_all_prefix_indices_negative(device, poison, close):
    args, extra = _case([3, 50], [3, 50], 2, 2, 32, torch.float32, device, ([10], [-1, -1]))
    _check(args, extra, True, torch.float32, close)


def test_single_token_and_empty_batch(device):
    args, _ = _case([1], [1], 2, 1, 32, torch.float32, device)
    out = varlen_attention_triton(*args, causal=True, scale=1.0)
    torch.testing.assert_close(out, args[2].repeat_interleave(2, dim=1))  # softmax over one key = v
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    empty = varlen_attention_triton(args[0][:0], args[1][:0], args[2][:0], zero, zero, causal=True, scale=1.0)
    assert empty.shape == (0, 2, 32)


def test_bad_inputs(device):
    args, _ = _case([4], [4], 3, 2, 32, torch.float32, device)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention_triton(*args, causal=True, scale=1.0)
    args, _ = _case([4], [4], 2, 1, 32, torch.float32, device)
    with pytest.raises(ValueError, match="prefix"):
        varlen_attention_triton(*args, causal=True, scale=1.0, prefix_index=torch.tensor([0], device=device))


@pytest.mark.parametrize("causal", [True, False])
def test_schedule_covers_every_block_once_heaviest_first(causal, device):
    lens_q, lens_k = [5, 0, 64, 65, 1, 200], [5, 0, 64, 90, 1, 200]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    cu_p, index = _cu([30, 4], device), torch.tensor([1, -1, 0, -1, 0, 1], device=device)
    block_t = 32
    n_slots = -(-sum(lens_q) // block_t) + len(lens_q)
    sched = build_schedule(cu_q, cu_k, block_t, n_slots, causal, cu_p, index).cpu()
    assert sched.dtype == torch.int32 and sched.shape == (n_slots, 2)
    real = [tuple(r) for r in sched.tolist() if r[0] >= 0]
    expected = {(s, b) for s, n in enumerate(lens_q) for b in range(-(-n // block_t))}
    assert sorted(real) == sorted(expected) and len(real) == len(expected)
    assert all(r[0] < 0 for r in sched.tolist()[len(real):]), "padding slots must come last"
    plen = [4, 0, 30, 0, 30, 4]

    def work(s, b):
        if not causal:
            return plen[s] + lens_k[s]
        return plen[s] + max(0, min(lens_k[s], (b + 1) * block_t + lens_k[s] - lens_q[s]))

    weights = [work(s, b) for s, b in real]
    assert weights == sorted(weights, reverse=True)


def test_schedule_cached_per_batch(device, monkeypatch):
    builds = []
    real_build = mod.build_schedule
    monkeypatch.setattr(mod, "build_schedule", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    args, _ = _case([3, 20], [3, 20], 2, 1, 32, torch.float32, device)
    a = varlen_attention_triton(*args, causal=True, scale=0.2)
    b = varlen_attention_triton(*args, causal=True, scale=0.2)  # next layer: same metadata
    assert len(builds) == 1 and torch.equal(a, b)
    cu_q, cu_k = args[3], args[4]
    cu_q.copy_(_cu([20, 3], device))  # metadata rewritten in place (static buffers): rebuild
    cu_k.copy_(cu_q)
    varlen_attention_triton(*args, causal=True, scale=0.2)
    assert len(builds) == 2


def test_dispatch_uses_triton(monkeypatch, device):
    calls = []
    monkeypatch.setattr(mod, "varlen_attention_triton",
                        lambda *a, **k: calls.append(1) or varlen_attention_triton(*a, **k))
    args, extra = _case([3, 20], [3, 20], 4, 2, 32, torch.float32, device, ([6], [0, 0]))
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    out = kernels.varlen_attention(*args, causal=True, scale=0.2, **extra)
    assert calls == [1]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = kernels.varlen_attention(*args, causal=True, scale=0.2, **extra)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_reference_long_sequences_in_bounded_blocks(causal, monkeypatch):
    """Past the explicit-scores size, the reference attends in query blocks (causal with a prefix) or
    through SDPA's fused kernel: the same result as explicit scores, never a whole score matrix."""
    args, extra = _case([37, 1, 64, 20], [37, 1, 64, 20], 4, 2, 16, torch.float32, "cpu",
                        prefix=([9, 30], [1, 0, -1, 1]))
    want = _ref(args, extra, causal, 0.25)  # all sequences small: explicit scores
    monkeypatch.setattr(mod, "_SMALL_SCORES", 4 * 5 * 40)  # a few query rows per block
    blocks = []
    real = mod._attend_small
    monkeypatch.setattr(mod, "_attend_small", lambda q, *a: blocks.append(q.shape[1]) or real(q, *a))
    got = _ref(args, extra, causal, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if causal:
        # Sequences with a prefix went by blocks of a few rows (the 64-token one without a prefix through SDPA).
        assert max(blocks) <= 4 and sum(blocks) == 37 + 1 + 20


def test_tma_allocator_is_set_on_every_thread():
    """triton.set_allocator is per thread (a ContextVar): an engine thread started after another thread
    set it must set its own, or TMA launches fail with "no allocator was set"."""
    import threading

    from triton.runtime import _allocation

    mod._ensure_allocator()
    assert _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR
    seen = []

    def engine_thread():
        before = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR  # a fresh thread starts without
        mod._ensure_allocator()
        seen.append((before, _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR))

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    assert seen == [(True, True)]
