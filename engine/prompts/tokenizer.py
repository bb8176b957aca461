"""Tokenizer files of a model folder, loaded with transformers (fast tokenizers only)."""
import threading
from pathlib import Path

from engine.weights import ModelNotFoundError

# Any one of these sets is a complete tokenizer.
_TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
    ("sentencepiece.bpe.model",),
    ("tokenizer.model",),
)


class TokenizerFilesMissing(ModelNotFoundError):
    pass


def load_tokenizer(folder: Path):
    folder = Path(folder)
    if not any(all((folder / f).is_file() for f in files) for files in _TOKENIZER_FILE_SETS):
        raise TokenizerFilesMissing(
            f"tokenizer file missing in {folder}: expected tokenizer.json "
            f"(or vocab.json + merges.txt, vocab.txt, sentencepiece.bpe.model)"
        )
    from transformers import AutoTokenizer

    from engine.weights import ModelFileError

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # a garbage tokenizer.json / tokenizer_config.json
        files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (folder / f).is_file()]
        raise ModelFileError(f"the tokenizer files in {folder} ({', '.join(files) or 'none'}) cannot be loaded: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"the tokenizer in {folder} has no fast (Rust) implementation")
    return SerializedTokenizer(tok)


class SerializedTokenizer:
    """A transformers tokenizer that several threads may call.

    Each call reconfigures the shared Rust tokenizer (truncation, padding) before
    encoding, so two threads interleaving would race ("Already borrowed", or one
    call's truncation applied to the other's texts). Calls are serialised; the
    Rust encoder itself still runs without the GIL, overlapping the model.
    """

    _LOCKED = ("__call__", "encode", "decode", "batch_decode", "pad", "convert_tokens_to_ids", "tokenize")

    def __init__(self, tokenizer):
        object.__setattr__(self, "_tok", tokenizer)
        object.__setattr__(self, "_lock", threading.RLock())

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._tok, name)
        if name in self._LOCKED and callable(attr):
            def locked(*args, **kwargs):
                with self._lock:
                    return attr(*args, **kwargs)
            return locked
        return attr

    def __setattr__(self, name, value):
        setattr(self._tok, name, value)

    def __len__(self):
        return len(self._tok)

    def __repr__(self):
        return f"SerializedTokenizer({self._tok!r})"

    @property
    def unwrapped(self):
        return self._tok


def token_id(tokenizer, text: str) -> int:
    """The id of ``text`` when it is exactly one token; never hard-code ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token in this tokenizer (got {ids})")
    return ids[0]


# Clipping long texts by characters before the tokenizer sees them. A 7 MB document tokenized whole,
# with offsets, costs about 1.2 GB that the allocator never returns; truncation inside the tokenizer
# happens only after the whole text is encoded. A cut that leaves at least CLIP_MARGIN_TOKENS tokens and
# CLIP_MARGIN_CHARS characters beyond the last kept token changes none of the kept tokens: pre-tokens end
# at whitespace and punctuation, and BPE merges act within a few symbols of the cut.
CLIP_MARGIN_TOKENS = 16
CLIP_MARGIN_CHARS = 256
CLIP_CHARS_PER_TOKEN = 8  # the first guess; the cut doubles until it holds enough tokens


def clip_text(tokenizer, text: str, max_tokens: int, from_end: bool = False) -> str:
    """``text`` cut by characters to a part whose first (or, ``from_end``, last) ``max_tokens``
    tokens are exactly those of the whole text. Short texts come back unchanged, untokenized."""
    need = max(1, int(max_tokens)) + CLIP_MARGIN_TOKENS
    bound = need * CLIP_CHARS_PER_TOKEN + CLIP_MARGIN_CHARS
    while bound < len(text):
        cut = text[-bound:] if from_end else text[:bound]
        offsets = tokenizer(cut, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                            return_attention_mask=False)["offset_mapping"]
        if len(offsets) >= need:
            if from_end:
                safe = offsets[len(offsets) - need][0] >= CLIP_MARGIN_CHARS
            else:
                safe = offsets[need - 1][1] <= len(cut) - CLIP_MARGIN_CHARS
            if safe:
                return cut
        bound *= 2
    return text
