"""``compile=True``: every family's forward compiles as one graph (fullgraph) and scores as eager.

The kernels are registered torch ops with fake kernels, so dynamo traces each
family's forward without a graph break (``fullgraph=True`` turns any break
into an error), and with dynamic shapes a new batch shape reuses the graph.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from engine.api import Embedder, Reranker
from engine.cli import _parser
from kalm_tiny import build_kalm
from tiny_qwen3_5 import make_qwen3_5

QUERY = "what is the capital of china"
DOCS = ["Beijing is the capital of China.", "Paris is in France", "cats sleep a lot", "x",
        "a much longer document about capitals and rivers " * 12, "Shanghai is a port", "the sky is blue"]
# Batches of different sizes and lengths: the second and third reuse the first one's graph.
BATCHES = [DOCS, DOCS[:2], DOCS[3:] + DOCS[:1]]


@pytest.fixture(scope="module")
def folders(make_qwen3, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    build_kalm(root / "KaLM-Reranker-tiny", seed=5)
    return {"qwen3": make_qwen3(), "qwen3_5": make_qwen3_5(root, seed=3),
            "t5gemma2": root / "KaLM-Reranker-tiny"}


def _scores(model, batches, query):
    if isinstance(model, Embedder):
        return [model.embed([query] + docs) for docs in batches]
    return [torch.tensor(model.predict([(query, d) for d in docs])).numpy() for docs in batches]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5", "t5gemma2", "bert"])
def test_fullgraph_compile_matches_eager(family, folders):
    torch._dynamo.reset()
    counters.clear()
    if family == "bert":  # the bundled all-MiniLM-L6-v2 (BertModel), embedding
        eager, compiled = Embedder(device="cpu"), Embedder(device="cpu", compile=True)
    else:
        eager = Reranker(str(folders[family]), device="cpu")
        compiled = Reranker(str(folders[family]), device="cpu", compile=True)
    assert compiled.engine.runner.forward is not compiled.engine.runner.model
    want = _scores(eager, BATCHES, QUERY)
    got = _scores(compiled, BATCHES, QUERY)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        assert abs(w - g).max() <= 1e-4, (family, abs(w - g).max())
        assert w.std() > 1e-3  # the comparison is not between constants
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{family}: {graphs} graphs for {len(BATCHES)} batch shapes"


def test_compile_flag_reaches_the_engine():
    args = _parser().parse_args(["rank", "--compile", "--query", "q", "--documents", "d.jsonl"])
    assert args.compile is True
    assert _parser().parse_args(["serve"]).compile is False
