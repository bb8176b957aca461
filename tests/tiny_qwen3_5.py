"""Tiny random Qwen3.5 checkpoints with the real Qwen3.5 tokenizer, and the transformers
reference of Prism-Reranker's score (imported by the Qwen3.5 tests; nothing downloads)."""
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwen_vocab import QWEN3_5_VOCAB_SIZE, build_qwen3_5_backend, save_qwen3_tokenizer

# Mixed layer types, GVA in the DeltaNet layers (2 key heads, 4 value heads), GQA in attention.
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


@functools.lru_cache(maxsize=None)
def qwen3_5_backend():
    return build_qwen3_5_backend()


@functools.lru_cache(maxsize=None)
def _tokenizer_files():
    # Saving a 248k-token tokenizer takes seconds: save it once, copy it into each model folder.
    folder = Path(tempfile.mkdtemp(prefix="qwen3_5_tokenizer_"))
    save_qwen3_tokenizer(qwen3_5_backend(), folder)
    return folder


def tiny_text_config(tie: bool = True, **overrides):
    from transformers import Qwen3_5TextConfig

    kw = dict(
        vocab_size=248320, hidden_size=32, intermediate_size=64, num_hidden_layers=len(LAYER_TYPES),
        layer_types=LAYER_TYPES, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        initializer_range=0.1,  # large enough that scores spread over (0, 1)
        rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [1, 1, 2], "mrope_interleaved": True},
        pad_token_id=248044, eos_token_id=248046,
    )
    kw.update(overrides)
    assert kw["vocab_size"] >= QWEN3_5_VOCAB_SIZE
    return Qwen3_5TextConfig(**kw)


def make_qwen3_5(root: Path, name: str = "Prism-Reranker-tiny", tie: bool = True, nested: bool = False,
                 seed: int = 0) -> Path:
    """Save a random Qwen3_5ForCausalLM (or, ``nested``, a Qwen3_5ForConditionalGeneration with a
    vision tower and MTP tensors) and the Qwen3.5 tokenizer under ``root / name``."""
    from transformers import Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    folder = root / name
    torch.manual_seed(seed)
    text = tiny_text_config(tie)
    if nested:
        cfg = Qwen3_5Config(text_config=text.to_dict(), tie_word_embeddings=tie,
                            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                               out_hidden_size=32))
        model = Qwen3_5ForConditionalGeneration(cfg).eval()
    else:
        model = Qwen3_5ForCausalLM(text).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    if nested:  # released checkpoints also carry the multi-token-prediction head
        path = folder / "model.safetensors"
        tensors = load_file(str(path))
        tensors["mtp.fc.weight"] = torch.randn(32, 64)
        tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(32)
        save_file(tensors, str(path), metadata={"format": "pt"})
    for f in _tokenizer_files().iterdir():
        shutil.copy(f, folder / f.name)
    return folder


class PrismReference:
    """transformers' Qwen3.5 forward on each whole prompt (no padding): sigmoid(l_yes - l_no) at the last position."""

    def __init__(self, folder, nested: bool = False, tokenizer=None):
        from transformers import AutoTokenizer, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

        cls = Qwen3_5ForConditionalGeneration if nested else Qwen3_5ForCausalLM
        # Loading the 248k-token tokenizer takes seconds: tests may pass one already loaded from the folder.
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(folder))
        self.model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.yes = self.tokenizer.convert_tokens_to_ids("yes")
        self.no = self.tokenizer.convert_tokens_to_ids("no")

    def prompt_ids(self, query, doc, instruction=None):
        from engine.prompts.templates import PRISM_INSTRUCTION, PRISM_PREFIX, QWEN3_RERANK_SUFFIX

        text = (f"{PRISM_PREFIX}<Instruct>: {instruction or PRISM_INSTRUCTION}\n<Query>: {query}\n"
                f"<Document>: {doc}{QWEN3_RERANK_SUFFIX}")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def scores(self, pairs, instruction=None):
        out = []
        for q, d in pairs:
            ids = torch.tensor([self.prompt_ids(q, d, instruction)])
            logits = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1]
            out.append(torch.sigmoid(logits[self.yes] - logits[self.no]).item())
        return out
