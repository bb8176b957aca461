"""Tokenizer files of a model folder, loaded with transformers (fast tokenizers only)."""
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

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if not getattr(tok, "is_fast", False):
        raise TypeError(f"the tokenizer in {folder} has no fast (Rust) implementation")
    return tok


def token_id(tokenizer, text: str) -> int:
    """The id of ``text`` when it is exactly one token; never hard-code ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token in this tokenizer (got {ids})")
    return ids[0]
