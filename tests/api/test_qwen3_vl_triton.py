"""Qwen3-VL through the Triton kernels (CPU interpreter): the vision tower's bidirectional varlen
attention and rotary without q/k norms, and M-RoPE tables in the q/k-norm + RoPE kernel."""
import os

import numpy as np
import pytest
import torch

from engine import Reranker
from tiny_qwen3_vl import Qwen3VLReference, sample_images, tiny_qwen3_vl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs Triton kernels on CPU tensors, which needs TRITON_INTERPRET=1")


def test_reranker_with_images_through_triton(tmp_path_factory, qwen3_backend, monkeypatch):
    folder = tiny_qwen3_vl(tmp_path_factory, qwen3_backend, "Qwen3-VL-Reranker-tiny")
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    import kernels

    assert kernels.use_triton(torch.zeros(1))
    im = sample_images()
    docs = [{"image": im["square"]}, "text only", {"text": "caption", "image": [im["100x70"], im["rgba"]]}]
    ranked = Reranker(str(folder), device="cpu").rank("what is shown", docs)
    got = [r["score"] for r in sorted(ranked, key=lambda r: r["index"])]
    monkeypatch.setenv("ENGINE_KERNELS", "torch")
    ref = Qwen3VLReference(folder)
    want = [ref.score(("what is shown", []), (d, []) if isinstance(d, str) else
                      (d.get("text"), d["image"] if isinstance(d["image"], list) else [d["image"]])) for d in docs]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
