"""Bad input gets a clear error naming the problem; odd-but-valid input is served."""
import json
import shutil

import pytest

from engine import Embedder, Reranker
from engine.weights import ModelNotFoundError, WeightError


@pytest.fixture(scope="module")
def reranker(make_qwen3):
    return Reranker(str(make_qwen3()), device="cpu")


def test_empty_document_list(reranker):
    assert reranker.rank("q", []) == []
    assert reranker.predict([]) == []


def test_empty_string_document_is_scored(reranker):
    out = reranker.rank("q", ["", "text"])
    assert len(out) == 2 and all(0.0 < r["score"] < 1.0 for r in out)


def test_non_string_document_names_index(reranker):
    with pytest.raises(TypeError, match=r"documents\[2\]"):
        reranker.rank("q", ["a", "b", 3])
    with pytest.raises(TypeError, match=r"documents\[0\]"):
        reranker.rank("q", [None])
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        reranker.predict([("q", "d"), ("q", 5)])
    with pytest.raises(TypeError, match="query"):
        reranker.rank(["q"], ["a"])
    with pytest.raises(TypeError, match="single string"):
        reranker.rank("q", "abc")


def test_bad_top_n(reranker):
    with pytest.raises(ValueError, match="top_n"):
        reranker.rank("q", ["a"], top_n=0)


def test_dimensions_larger_than_hidden(make_qwen3):
    emb = Embedder(str(make_qwen3(name="Qwen3-Embedding-tiny", embed_tokenizer=True)), device="cpu")
    with pytest.raises(ValueError, match="larger than the embedding size 64"):
        emb.embed(["x"], dimensions=65)
    with pytest.raises(ValueError, match="positive integer"):
        emb.embed(["x"], dimensions=0)
    assert emb.embed([], dimensions=16).shape == (0, 16)
    assert emb.embed("one text").shape == (1, 64)


def _copy(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def test_missing_tensor_is_named(make_qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(make_qwen3(), tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"missing tensor.*layers\.1\.self_attn\.k_proj\.weight"):
        Reranker(str(dst), device="cpu")


def test_unexpected_and_misshaped_tensors_are_named(make_qwen3, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    dst = _copy(make_qwen3(), tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"unexpected tensor.*mlp\.extra\.weight"):
        Reranker(str(dst), device="cpu")
    del tensors["model.layers.0.mlp.extra.weight"]
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"model\.norm\.weight has shape \(65,\)"):
        Reranker(str(dst), device="cpu")
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match=r"model\.norm\.weight has dtype I32"):
        Reranker(str(dst), device="cpu")


def test_untied_checkpoint_without_lm_head(make_qwen3, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = _copy(make_qwen3(tie=False), tmp_path)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightError, match="lm_head.weight"):
        Reranker(str(dst), device="cpu")


def test_missing_tokenizer_and_weights_and_config(make_qwen3, tmp_path):
    dst = _copy(make_qwen3(), tmp_path)
    (dst / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer file missing"):
        Reranker(str(dst), device="cpu")
    dst2 = _copy(make_qwen3(), tmp_path / "b")
    (dst2 / "model.safetensors").rename(dst2 / "pytorch_model.bin")
    with pytest.raises(WeightError, match="pickled weights are never loaded"):
        Reranker(str(dst2), device="cpu")
    (dst2 / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        Reranker(str(dst2), device="cpu")


def test_missing_shard_is_named(make_qwen3, tmp_path):
    dst = _copy(make_qwen3(sharded=True), tmp_path)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (dst / shard).unlink()
    with pytest.raises(WeightError, match=shard):
        Reranker(str(dst), device="cpu")


def test_unknown_architecture_lists_supported(make_qwen3, tmp_path):
    dst = _copy(make_qwen3(), tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*Qwen3ForCausalLM"):
        Reranker(str(dst), device="cpu")


def test_missing_local_folder_and_offline_hub_id(monkeypatch, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Reranker(str(tmp_path / "nope"), device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline"):
        Reranker("someorg/not-cached-model", device="cpu")
