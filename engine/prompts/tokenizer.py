"""Tokenizer files of a model folder, loaded with transformers (fast tokenizers only)."""
import logging
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
        object.__setattr__(self, "truncated", 0)  # texts (or pairs) cut by truncation=True, ever

    def __call__(self, *args, **kwargs):
        with self._lock:
            out = self._tok(*args, **kwargs)
            if kwargs.get("truncation"):
                self._count_truncated(out, kwargs.get("max_length"))
            return out

    def _count_truncated(self, out, max_length) -> None:
        """Counts the inputs truncation cut (the Rust encoder keeps what it cut as ``overflowing``);
        the first one is logged, every one is counted (stats' ``truncated_inputs``, /metrics)."""
        encodings = getattr(out, "encodings", None) or ()
        n = sum(1 for e in encodings if e.overflowing)
        if n:
            if not self.truncated:
                logging.getLogger("engine").warning(
                    "an input longer than max_length (%s tokens) was truncated; later ones are counted, not logged "
                    "(truncated_inputs in stats, rerank_engine_truncated_inputs in /metrics)", max_length)
            object.__setattr__(self, "truncated", self.truncated + n)

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
