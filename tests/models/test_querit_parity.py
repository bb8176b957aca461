"""Querit-Reranker (Qwen3 backbone + 2-way head at an appended [CLS]) against a transformers reference,
and user-supplied prompt templates."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer

from engine import Reranker
from engine.prompts.user_template import QUERIT_DEFAULT, QUERIT_WITH_INSTRUCTION, TemplateError
from qwen_vocab import save_qwen3_tokenizer
from reference_qwen3 import QWEN3_JINJA, Qwen3RerankerReference
from textgen import random_text

ATOL = 1e-4


def build_querit(folder, backend, seed=0, arch="MLQwen3Model"):
    """A tiny random Qwen3 backbone + Linear(hidden, 2) head, saved with ``model.*`` and ``head.*`` keys,
    and the Qwen tokenizer with a ``[CLS]`` token added after Qwen3's 26 (id 151669)."""
    from transformers import Qwen3Config, Qwen3Model

    tok = Tokenizer.from_str(backend.to_str())
    tok.add_special_tokens([AddedToken("[CLS]", special=True, normalized=False)])
    assert tok.token_to_id("[CLS]") == 151669
    cfg = Qwen3Config(vocab_size=151670, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      rope_theta=1_000_000.0, rms_norm_eps=1e-6, initializer_range=0.1, pad_token_id=151643,
                      eos_token_id=151645, num_labels=2, architectures=[arch])
    torch.manual_seed(seed)
    model = Qwen3Model(cfg).eval()
    head = torch.nn.Linear(cfg.hidden_size, 2)
    with torch.no_grad():
        model.embed_tokens.weight[cfg.pad_token_id].normal_(0.0, 0.1)
        head.weight.normal_(0.0, 0.5)
        head.bias.normal_(0.0, 0.5)
    folder.mkdir(parents=True)
    cfg.save_pretrained(str(folder))
    saved = json.loads((folder / "config.json").read_text())
    saved["num_labels"] = 2  # as Querit's config.json states it (transformers omits its default)
    (folder / "config.json").write_text(json.dumps(saved))
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_qwen3_tokenizer(tok, folder)
    return model, head


class QueritReference:
    """Left-padded batch through transformers' Qwen3Model with a 4D mask in which content attends causally
    to content and [CLS] attends to all; softmax(head(h_cls)) . [-1, 1]."""

    def __init__(self, folder, model, head, max_length=4096):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model, self.head, self.max_length = model, head, max_length
        self.cls = self.tokenizer.convert_tokens_to_ids("[CLS]")

    def encode(self, query, doc, instruction=None):
        text = (QUERIT_DEFAULT if instruction is None else QUERIT_WITH_INSTRUCTION).format(
            query=query, document=doc, instruction=instruction)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length - 1]
        return ids + [self.cls]

    @torch.inference_mode()
    def scores(self, pairs, instruction=None):
        seqs = [self.encode(q, d, instruction) for q, d in pairs]
        n, width = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((n, width), self.tokenizer.pad_token_id)
        real = torch.zeros(n, width, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            real[i, width - len(s):] = True
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        allowed = causal[None] & real[:, None, :] & real[:, :, None]
        allowed[:, -1, :] = real  # [CLS] (the last position) attends to every real token
        allowed |= torch.eye(width, dtype=torch.bool)[None]  # padded rows see themselves (no NaN rows)
        mask = torch.zeros(n, 1, width, width).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        h = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        p = torch.softmax(self.head(h).float(), dim=-1)
        return (p @ torch.tensor([-1.0, 1.0])).tolist()


@pytest.fixture(scope="module")
def querit(tmp_path_factory, qwen3_backend):
    folder = tmp_path_factory.mktemp("querit") / "Querit-4B-tiny"
    model, head = build_querit(folder, qwen3_backend)
    return folder, model, head


def test_querit_matches_reference(querit, rng):
    folder, model, head = querit
    ours = Reranker(str(folder), device="cpu")
    assert ours.engine.arch == "MLQwen3Model" and ours.engine.max_length == 4096
    ref = QueritReference(folder, model, head)
    pairs = [(random_text(rng, rng.randint(1, 12)), random_text(rng, n)) for n in (0, 1, 5, 17, 40, 90)]
    got, want = ours.predict(pairs), ref.scores(pairs)
    assert np.std(want) > 0.05, want
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert all(-1 <= s <= 1 for s in got)
    instr = "Find passages about rivers."
    np.testing.assert_allclose(ours.predict(pairs, instruction=instr), ref.scores(pairs, instr), atol=ATOL, rtol=0)
    # raw_scores: z1 - z0, whose tanh(/2) is the score
    raw = np.array(ours.predict(pairs, raw_scores=True))
    np.testing.assert_allclose(np.tanh(raw / 2), got, atol=1e-5)


def test_querit_truncation_and_prefix_sharing(querit, rng):
    folder, model, head = querit
    shared = Reranker(str(folder), device="cpu", max_length=48)
    plain = Reranker(str(folder), device="cpu", max_length=48, share_prefix=False)
    ref = QueritReference(folder, model, head, max_length=48)
    query = random_text(rng, 5)
    pairs = [(query, random_text(rng, n)) for n in (3, 30, 80, 200)]
    seqs = shared.engine.template.encode([q for q, _ in pairs], [d for _, d in pairs])
    assert max(len(s) for s in seqs.ids) == 48 and all(s[-1] == ref.cls for s in seqs.ids)
    assert [ref.encode(q, d) for q, d in pairs] == seqs.ids
    stats = {}
    got = shared.predict(pairs, stats=stats)
    assert stats["tokens_saved"] > 0  # the text up to the document is shared
    np.testing.assert_allclose(got, ref.scores(pairs), atol=ATOL, rtol=0)
    np.testing.assert_allclose(plain.predict(pairs), got, atol=1e-5, rtol=0)


def test_qwen3_checkpoint_with_two_way_head_is_querit(tmp_path, qwen3_backend, rng):
    folder = tmp_path / "some-qwen3-2way"
    model, head = build_querit(folder, qwen3_backend, seed=1, arch="Qwen3ForCausalLM")
    rr = Reranker(str(folder), device="cpu")
    assert rr.engine.arch == "MLQwen3Model"
    pairs = [("q", random_text(rng, 9)), ("another", random_text(rng, 3))]
    np.testing.assert_allclose(rr.predict(pairs), QueritReference(folder, model, head).scores(pairs), atol=ATOL)


# --- user templates ---------------------------------------------------------------------------

def test_user_template_reproducing_qwen3_gives_identical_scores(make_qwen3, tmp_path, rng):
    folder = make_qwen3()
    jinja = tmp_path / "qwen3.jinja"
    jinja.write_text(QWEN3_JINJA)
    builtin = Reranker(str(folder), device="cpu")
    user = Reranker(str(folder), device="cpu", template=str(jinja))
    fmt = Reranker(str(folder), device="cpu", template="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
                   template_prefix=QWEN3_JINJA.split("<Instruct>")[0],
                   template_suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    query = "what is the capital of china?"
    docs = [random_text(rng, n) for n in (0, 1, 8, 33, 70)]
    want = builtin.predict([(query, d) for d in docs])
    for rr in (user, fmt):
        stats = {}
        got = rr.predict([(query, d) for d in docs], stats=stats)
        assert stats["tokens_saved"] > 0  # prefix sharing found by itself
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        assert rr.engine.template.encode([query] * len(docs), docs).ids == \
            builtin.engine.template.encode([query] * len(docs), docs).ids
    np.testing.assert_allclose(want, Qwen3RerankerReference(folder).scores([(query, d) for d in docs]), atol=ATOL)


def test_template_whose_prefix_changes_falls_back_and_stays_exact(make_qwen3, rng, caplog):
    folder = make_qwen3()
    # The document is glued to a word before it: the head's last token depends on the document.
    tpl = "<|im_start|>user\nQ: {query} D:x{document}<|im_end|>\n<|im_start|>assistant\n"
    rr = Reranker(str(folder), device="cpu", template=tpl)
    docs = ["yz and more", "123", random_text(rng, 20)]
    with caplog.at_level("INFO", logger="engine"):
        stats = {}
        got = rr.predict([("q", d) for d in docs], stats=stats)
    assert stats["tokens_saved"] == 0 and "no prefix sharing" in caplog.text
    alone = [rr.predict([("q", d)])[0] for d in docs]
    np.testing.assert_allclose(got, alone, atol=1e-6)
    ids = rr.engine.template.encode(["q"] * 3, docs).ids
    tok = rr.engine.tokenizer
    assert ids == [tok(tpl.format(query="q", document=d), add_special_tokens=False)["input_ids"] for d in docs]


def test_bad_templates_are_clear_errors(make_qwen3, tmp_path):
    folder = str(make_qwen3())
    with pytest.raises(TemplateError, match=r"\{document\} exactly once"):
        Reranker(folder, device="cpu", template="Query: {query}")
    with pytest.raises(TemplateError, match=r"unknown placeholder \{passage\}"):
        Reranker(folder, device="cpu", template="{query} {passage}")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ query }\n{{ document }}")
    with pytest.raises(TemplateError, match=r"bad.jinja, line 1: Jinja syntax error"):
        Reranker(folder, device="cpu", template=str(bad))
    none = tmp_path / "none.jinja"
    none.write_text("{{ query }} only")
    with pytest.raises(TemplateError, match=r"none.jinja must place \{\{ document \}\} exactly once"):
        Reranker(folder, device="cpu", template=str(none))
    with pytest.raises(ValueError, match="label tokens: 'yes please' is not a single token"):
        Reranker(folder, device="cpu", label_tokens=["yes please", "no"])
    with pytest.raises(ValueError, match="template must be one of"):
        Reranker(folder, device="cpu", template="qwen4")


def test_label_tokens(make_qwen3, rng):
    folder = make_qwen3()
    default = Reranker(str(folder), device="cpu")
    tf = Reranker(str(folder), device="cpu", label_tokens=["true", "false"])
    pairs = [("q", random_text(rng, 10)), ("q", random_text(rng, 30))]
    ref = Qwen3RerankerReference(folder)
    ref.yes, ref.no = ref.tokenizer.convert_tokens_to_ids("true"), ref.tokenizer.convert_tokens_to_ids("false")
    np.testing.assert_allclose(tf.predict(pairs), ref.scores(pairs), atol=ATOL)
    assert np.max(np.abs(np.array(tf.predict(pairs)) - np.array(default.predict(pairs)))) > 1e-4


def test_template_with_the_query_after_the_document(make_qwen3, rng):
    """The head is the same for every query here; what follows the document is not. Each query's tails
    still carry its own text, concurrently or not, and equal the unshared pairs."""
    folder = str(make_qwen3())
    tpl = "<|im_start|>user\nDocument: {document}\nQuestion: {query}<|im_end|>\n<|im_start|>assistant\n"
    shared = Reranker(folder, device="cpu", template=tpl)
    plain = Reranker(folder, device="cpu", template=tpl, share_prefix=False)
    docs = [random_text(rng, n) for n in (2, 15, 40)]
    pairs = [(q, d) for q in ("first question", "a second, longer question") for d in docs]
    stats = {}
    got = shared.predict(pairs, stats=stats)
    assert stats["tokens_saved"] > 0
    np.testing.assert_allclose(got, plain.predict(pairs), atol=1e-6, rtol=0)
    tok = shared.engine.tokenizer
    assert shared.engine.template.encode([q for q, _ in pairs], [d for _, d in pairs]).ids == \
        [tok(tpl.format(query=q, document=d), add_special_tokens=False)["input_ids"] for q, d in pairs]
