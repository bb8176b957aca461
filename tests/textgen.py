"""Random English-like texts for tests (import from here, not from conftest: several conftests exist)."""
import random

WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or had "
    "river mountain city engine model search query passage answer capital china beijing gravity "
    "attracts bodies toward one another protein cell energy market price history war king music "
    "film game team season league player water climate ocean forest bird animal plant"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))
