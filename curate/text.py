"""Text normalisation and hashing: the identity used for exact duplicates and content addressing."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The runs of word characters of the case-folded NFKC text: punctuation and whitespace of
    any kind only separate words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def normalise(text: str) -> str:
    """Case-folded, NFKC, punctuation dropped, whitespace collapsed: two texts that differ only in
    these are the same document for deduplication."""
    return " ".join(words(text))


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=12).hexdigest()


def content_hash(parts: Iterable[str]) -> str:
    """Hash of an ordered sequence of exact strings (ids, texts, model fingerprints)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def ngrams(text: str, n: int = 3) -> set[str]:
    tokens = words(text)
    return {" ".join(tokens[i : i + n]) for i in range(max(1, len(tokens) - n + 1))}


def ngram_overlap(a: str, b: str, n: int = 3) -> float:
    """Jaccard overlap of word n-grams of the normalised texts."""
    ga, gb = ngrams(a, n), ngrams(b, n)
    return len(ga & gb) / len(ga | gb) if ga and gb else 0.0


class LazyMap(Mapping):
    """A mapping built on first use from ``make``: a run that never looks a text up (no
    false-negative check, no teacher) never builds a dict of every document (10M at MS MARCO
    scale)."""

    def __init__(self, make: Callable[[], dict]):
        self._make, self._dict = make, None

    def _d(self) -> dict:
        if self._dict is None:
            self._dict = self._make()
        return self._dict

    def __getitem__(self, key):
        return self._d()[key]

    def __iter__(self) -> Iterator:
        return iter(self._d())

    def __len__(self) -> int:
        return len(self._d())
