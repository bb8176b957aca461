"""Paged attention: own windowed keys + cross keys read through a block table, one softmax."""
import math

import pytest
import torch
from kernel_helpers import DEVICE, DTYPES

import kernels
from kernels.paged_attention import paged_attention_ref, paged_attention_triton

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LENS = [1, 2, 17, 40, 9]  # ragged: one token, two, odd, past a block
CROSS = [3, 0, 37, 16, 1]  # a passage of 0 rows, exactly one page, one row
# (window_left, window_right): causal, Gemma sliding causal, T5Gemma2 encoder sliding (W=7), full bidirectional
WINDOWS = {"causal": (None, 1), "slide-causal": (5, 1), "slide-bidir": (4, 4), "bidir": (None, None)}


def _cu(lens):
    return torch.tensor([0] + list(lens), device=DEVICE).cumsum(0).to(torch.int32)


def _paged(cross_lens, hkv, d, dtype, page, layers=2, layer=1, spare=5):
    """A pool [blocks, layers, 2, page, Hkv, D] like the engine's K/V cache; each passage gets
    shuffled, non-contiguous blocks; every slot no passage owns is NaN (must never be read)."""
    need = [math.ceil(n / page) for n in cross_lens]
    n_blocks = sum(need) + spare
    pool = torch.full((n_blocks, layers, 2, page, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    perm = torch.randperm(n_blocks).tolist()
    table = torch.zeros(len(cross_lens), max(max(need), 1), dtype=torch.int32)
    for i, (n, nb) in enumerate(zip(cross_lens, need)):
        blocks, perm = perm[:nb], perm[nb:]
        table[i, :nb] = torch.tensor(blocks, dtype=torch.int32)
        for r in range(n):
            pool[blocks[r // page], :, :, r % page] = torch.randn(layers, 2, hkv, d, dtype=dtype, device=DEVICE)
    k_cache, v_cache = pool[:, layer, 0], pool[:, layer, 1]  # strided views, as the decoder reads them
    return k_cache, v_cache, table.to(DEVICE), torch.tensor(cross_lens, dtype=torch.int32, device=DEVICE)


def _inputs(lens, hq, hkv, d, dtype):
    # q/k/v as views of one fused qkv buffer (non-contiguous), like the model passes them.
    total = sum(lens)
    qkv = torch.randn(total, (hq + 2 * hkv) * d, dtype=dtype, device=DEVICE).view(total, hq + 2 * hkv, d)
    return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]


def _naive(q, k, v, cu, scale, left, right, k_cache=None, v_cache=None, table=None, cross_lens=None):
    # One sequence, one head at a time, float64, explicit softmax: an independent check of the reference.
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu = cu.tolist()
    group = q.shape[1] // k.shape[1]
    page = k_cache.shape[1] if k_cache is not None else 1
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        for h in range(q.shape[1]):
            for t in range(e - s):
                row = []
                for j in range(e - s):
                    if (left is None or t - j < left) and (right is None or j - t < right):
                        row.append((k[s + j, h // group], v[s + j, h // group]))
                if k_cache is not None:
                    for r in range(int(cross_lens[i])):
                        b = int(table[i, r // page])
                        row.append((k_cache[b, r % page, h // group], v_cache[b, r % page, h // group]))
                ks = torch.stack([a for a, _ in row]).double()
                vs = torch.stack([b for _, b in row]).double()
                w = torch.softmax(ks @ q[s + t, h].double() * scale, 0)
                out[s + t, h] = w @ vs
    return out


def test_reference_matches_naive():
    q, k, v = _inputs([1, 6, 3], 4, 2, 16, torch.float32)
    cache = _paged([5, 0, 9], 2, 16, torch.float32, page=4)
    for left, right in WINDOWS.values():
        for extra in ({}, dict(zip(("k_cache", "v_cache", "block_tables", "cross_lens"), cache))):
            got = paged_attention_ref(q, k, v, _cu([1, 6, 3]), scale=0.3, window_left=left, window_right=right, **extra)
            want = _naive(q, k, v, _cu([1, 6, 3]), 0.3, left, right, *extra.values())
            assert torch.allclose(got.double(), want, atol=1e-5), (left, right)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("window", list(WINDOWS), ids=list(WINDOWS))
@pytest.mark.parametrize("heads", [(4, 1, 32), (2, 2, 16)], ids=lambda h: "hq%d-hkv%d-d%d" % h)
@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
def test_matches_ref(dtype, window, heads, cross, poison, close):
    hq, hkv, d = heads
    left, right = WINDOWS[window]
    q, k, v = _inputs(LENS, hq, hkv, d, dtype)
    extra = {}
    if cross:
        kc, vc, table, clens = _paged(CROSS, hkv, d, dtype, page=8)
        extra = dict(k_cache=kc, v_cache=vc, block_tables=table, cross_lens=clens)
    cu = _cu(LENS)
    out = paged_attention_triton(q, k, v, cu, scale=d**-0.5, window_left=left, window_right=right, **extra)
    up = {n: (t.float() if t.is_floating_point() else t) for n, t in extra.items()}
    ref = paged_attention_ref(q.float(), k.float(), v.float(), cu, scale=d**-0.5, window_left=left,
                              window_right=right, **up)
    assert out.dtype == dtype and out.shape == q.shape
    close(out, ref, TOL[dtype])


@pytest.mark.parametrize("page", [1, 5, 16, 64], ids=lambda p: f"page{p}")
def test_page_sizes_and_odd_head_dim(page, poison, close):
    # Pages smaller than, not dividing, and larger than the key tile; head_dim 24 (not a power of two).
    q, k, v = _inputs(LENS, 6, 2, 24, torch.float16)
    kc, vc, table, clens = _paged(CROSS, 2, 24, torch.float16, page=page)
    args = dict(scale=0.2, window_left=6, window_right=1, k_cache=kc, v_cache=vc, block_tables=table, cross_lens=clens)
    out = paged_attention_triton(q, k, v, _cu(LENS), **args)
    up = {n: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in args.items()}
    close(out, paged_attention_ref(q.float(), k.float(), v.float(), _cu(LENS), **up), TOL[torch.float16])


def test_block_tiles_and_head_packing(poison, close):
    # GQA 4 with every head packing the tile allows, and a long sequence over many key tiles.
    lens, cross = [70, 3], [50, 20]
    q, k, v = _inputs(lens, 8, 2, 16, torch.float32)
    kc, vc, table, clens = _paged(cross, 2, 16, torch.float32, page=4)
    args = dict(scale=0.25, window_left=None, window_right=1, k_cache=kc, v_cache=vc, block_tables=table,
                cross_lens=clens)
    ref = paged_attention_ref(q, k, v, _cu(lens), **args)
    for pack, block_m in ((1, 16), (2, 32), (4, 64)):
        close(paged_attention_triton(q, k, v, _cu(lens), pack=pack, block_m=block_m, block_n=16, **args), ref, 1e-4)


def test_dispatch_and_checks(monkeypatch):
    q, k, v = _inputs([3, 4], 2, 1, 16, torch.float32)
    cu = _cu([3, 4])
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = kernels.paged_attention(q, k, v, cu, scale=0.25, window_right=1)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    assert torch.allclose(kernels.paged_attention(q, k, v, cu, scale=0.25, window_right=1), ref, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_triton(q[:, :1].expand(-1, 3, -1), torch.cat((k, k), 1), torch.cat((v, v), 1), cu, scale=1.0)
    with pytest.raises(ValueError, match=">= 1"):
        paged_attention_triton(q, k, v, cu, scale=1.0, window_left=0)
