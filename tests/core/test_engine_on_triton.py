"""The whole engine through the Triton kernels (CPU interpreter), against the model-card reference.

Kept small: the interpreter runs every kernel program in Python.
"""
import os

import numpy as np
import pytest
import torch

from engine import Embedder, Reranker
from reference_qwen3 import Qwen3EmbeddingReference, Qwen3RerankerReference

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1")


@pytest.fixture
def triton_kernels(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    import kernels

    assert kernels.use_triton(torch.zeros(1))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_reranker_parity_through_triton(make_qwen3, triton_kernels, share_prefix):
    folder = make_qwen3(tie=False)
    pairs = [("what is the capital?", d) for d in ["", "a", "word " * 40, "北京 🙂", "\n spaced"]]
    got = Reranker(str(folder), device="cpu", share_prefix=share_prefix).predict(pairs)
    want = Qwen3RerankerReference(folder).scores(pairs)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_embedder_parity_through_triton(make_qwen3, triton_kernels):
    folder = make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)
    texts = ["x", "a longer text " * 10]
    got = torch.from_numpy(Embedder(str(folder), device="cpu").embed(texts, dimensions=32))
    want = Qwen3EmbeddingReference(folder).embed(texts, dimensions=32)
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999
