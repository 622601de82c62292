"""A word vocabulary for the caption decoder, built from the training captions.

Captions are short and plain (Flickr8k's average 11 words), so whole lowercase words are the
tokens, as in the captioning literature the decoder is compared with (Show, Attend and Tell
keeps the words seen at least 5 times); rarer words read as ``<unk>`` and are never written.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from mmret.errors import InputError

PAD, BOS, EOS, SEP, UNK = 0, 1, 2, 3, 4
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<unk>")
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """The lowercase words of ``text`` (punctuation dropped).

    >>> words("A dog's ball, in the snow .")
    ['a', "dog's", 'ball', 'in', 'the', 'snow']
    """
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id; ids 0-4 are ``<pad> <bos> <eos> <sep> <unk>``."""

    def __init__(self, entries: Sequence[str]) -> None:
        if tuple(entries[: len(SPECIALS)]) != SPECIALS:
            raise InputError(f"a vocabulary starts with {', '.join(SPECIALS)}")
        self.entries = list(entries)
        self._ids = {word: i for i, word in enumerate(self.entries)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Every word seen at least ``min_count`` times in ``texts``, most frequent first."""
        counts = Counter(word for text in texts for word in words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: -counts[w])
        if not kept:
            raise InputError(f"no word occurs {min_count} times in the training captions")
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.entries)

    def encode(self, text: str, max_words: int) -> list[int]:
        """The ids of the first ``max_words`` words of ``text`` (no special tokens added)."""
        return [self._ids.get(word, UNK) for word in words(text)[:max_words]]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of ``ids`` up to the first ``<eos>``, specials left out."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                out.append(self.entries[i])
        return " ".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"entries": self.entries}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        return cls(data["entries"])
