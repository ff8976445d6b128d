"""Text normalisation and hashing: the identity used for exact duplicates and content addressing."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

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
