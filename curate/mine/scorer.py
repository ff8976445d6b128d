"""Pair scorers for the false-negative check and teacher rescoring.

Two kinds, both loaded from a local folder (curate never downloads):

  cross_encoder  AutoModelForSequenceClassification over the pair "[CLS] query [SEP] doc [SEP]";
                 the score is the logit of a 1-label head, or logit(relevant) - logit(irrelevant)
                 of a 2-label head (log-odds)
  embedder       a bi-encoder through ``curate.embed.Encoder``; the score is the cosine of the
                 query and doc embeddings (the packaged all-MiniLM-L6-v2 may be named)

Pairs are batched by a padded-token budget, longest first, as in ``curate.embed.encoder``.
``PairScores`` scores each (query id, doc id) pair once and looks texts up only for the pairs
it scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from curate.config import EmbedConfig
from curate.embed import encoder as embed
from curate.errors import ConfigError

log = logging.getLogger(__name__)


class Scorer(Protocol):
    name: str

    def score(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        """[N] float32 relevance of docs[i] to queries[i]; higher is more relevant."""
        ...


def resolve(path: str, kind: str, key: str) -> Path:
    """The model folder for config key ``key`` (e.g. fncheck.scorer); checked before any work."""
    if kind == "embedder" and path.lower() in embed.PACKAGED_MODELS:
        return embed.resolve_model(path)
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{key}: {path!r} is not a local model folder with config.json; curate never "
            "downloads models: save one with save_pretrained and point the key at that folder"
        )
    if kind == "cross_encoder":
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            section = key.rsplit(".", 1)[0]
            raise ConfigError(
                f"{key}: {path!r} has no sequence-classification head (architectures {archs}); "
                "save a cross-encoder from AutoModelForSequenceClassification, or set "
                f"{section}.kind=embedder to score with a bi-encoder"
            )
    return folder


def relevance(logits):
    """[b, labels] -> [b]: the logit of a 1-label head, the log-odds of a 2-label head."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    if logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    raise ConfigError(
        f"cross-encoder has {logits.shape[1]} labels; a relevance model has 1 (a score) or 2 "
        "(irrelevant, relevant): use such a model or kind=embedder"
    )


@dataclass
class CrossEncoderScorer:
    tokenizer: object
    model: object
    device: str
    max_length: int
    name: str
    token_budget: int = 16384

    @classmethod
    def load(cls, path: Path, max_length: int, device: str = "auto") -> CrossEncoderScorer:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        device = embed.pick_device(device)
        model.to(device).eval()
        return cls(tokenizer, model, device, max_length, str(path))

    def score(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(list(queries), list(docs), truncation=True, max_length=self.max_length)
        lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64)
        out = np.empty(len(queries), dtype=np.float32)
        with torch.inference_mode():
            for idx in embed.token_budget_batches(lengths, self.token_budget):
                feats = {k: [enc[k][i] for i in idx] for k in enc.keys()}
                batch = self.tokenizer.pad(feats, return_tensors="pt").to(self.device)
                logits = self.model(**batch).logits.float()  # [b, labels]
                out[idx] = relevance(logits).cpu().numpy()
        return out


class VectorCache:
    """A scorer model's embeddings kept in the embeddings cache folder across runs, by text hash.

    A retrain loop, or one run after another on the same corpus, checks mostly the same texts
    with the same model: a base-size model at 256 tokens embeds ~3 texts/s on a 2-core CPU, so
    NFCorpus's check alone took 20 minutes every run. Files are append-only and content-addressed
    (``scorer-<model key>-<hash of their text hashes>.npz``), like the embed stage's, so a cache
    at a URL is pulled and pushed the same way and a stopped run leaves no partial file behind.
    """

    def __init__(self, folder: Path, model_key: str):
        self.folder, self.prefix = Path(folder), f"scorer-{model_key}-"
        self.hashes, self.vectors = np.empty(0, np.uint64), None
        for f in sorted(self.folder.glob(self.prefix + "*.npz")):
            with np.load(f) as z:
                self._add(z["hashes"], z["vectors"])

    def _add(self, hashes: np.ndarray, vectors: np.ndarray) -> None:
        new = ~np.isin(hashes, self.hashes)
        hashes, vectors = hashes[new], vectors[new]
        self.hashes = np.concatenate([self.hashes, hashes])
        self.vectors = vectors if self.vectors is None else np.concatenate([self.vectors, vectors])
        order = np.argsort(self.hashes, kind="stable")
        self.hashes, self.vectors = self.hashes[order], self.vectors[order]

    def encode(self, encoder: embed.Encoder, texts: list[str]) -> np.ndarray:
        """[N, D] embeddings of ``texts``: read from the cache, the rest embedded and saved."""
        from curate.embed.plan import text_hashes
        from curate.files import atomic_path

        hashes = text_hashes(texts)
        found = np.zeros(len(hashes), dtype=bool)
        if len(self.hashes):
            at = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
            found = self.hashes[at] == hashes
        todo = np.flatnonzero(~found)
        if len(todo):
            vectors = encoder.encode([texts[i] for i in todo]).astype(np.float32)
            name = hashlib.blake2b(hashes[todo].tobytes(), digest_size=8).hexdigest()
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.folder / f"{self.prefix}{name}.npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, hashes=hashes[todo], vectors=vectors)
            self._add(hashes[todo], vectors)
        log.info("scorer embeddings: %d of %d texts from the cache", int(found.sum()), len(texts))
        return self.vectors[np.searchsorted(self.hashes, hashes)]


@dataclass
class EmbedderScorer:
    encoder: embed.Encoder
    name: str
    cache: VectorCache | None = None

    @classmethod
    def load(cls, path: Path, max_length: int, device: str = "auto",
             cache_dir: Path | None = None) -> EmbedderScorer:
        cfg = EmbedConfig(model=str(path), max_length=max_length, device=device)
        encoder = embed.Encoder.load(cfg, path)
        cache = None
        if cache_dir is not None:  # the weights, the length and the dtype decide the vectors
            spec = [embed.model_fingerprint(path), max_length, embed.local_dtype(cfg),
                    encoder.pooling]
            key = hashlib.blake2b(json.dumps(spec).encode(), digest_size=8).hexdigest()
            cache = VectorCache(cache_dir, key)
        return cls(encoder, str(path), cache)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self.cache is None:
            return self.encoder.encode(texts)
        return self.cache.encode(self.encoder, texts)

    def score(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        """Cosine of the embeddings; each distinct text is embedded once."""
        uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        ud, di = np.unique(np.asarray(docs, dtype=object), return_inverse=True)
        qv = self._encode(uq.tolist())  # [Uq, D]
        dv = self._encode(ud.tolist())  # [Ud, D]
        return np.einsum("nd,nd->n", qv[qi], dv[di]).astype(np.float32)


def load(path: str, kind: str, max_length: int, key: str, device: str = "auto",
         cache_dir: Path | None = None) -> Scorer:
    """The scorer of config key ``key``; an embedder keeps its embeddings in ``cache_dir`` (a
    cross-encoder scores pairs, which a later run rarely repeats, so it caches nothing)."""
    folder = resolve(path, kind, key)
    log.info("%s: loading %s scorer from %s", key, kind, folder)
    if kind == "cross_encoder":
        return CrossEncoderScorer.load(folder, max_length, device)
    return EmbedderScorer.load(folder, max_length, device, cache_dir)


class PairScores:
    """Scores of (query id, doc id) pairs, each computed once, texts looked up on demand."""

    def __init__(self, scorer: Scorer, query_text: Mapping[str, str], doc_text: Mapping[str, str]):
        self.scorer, self.query_text, self.doc_text = scorer, query_text, doc_text
        self.cache: dict[tuple[str, str], float] = {}

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        todo = sorted({p for p in pairs if p not in self.cache})  # sorted: same batches every run
        if todo:
            got = self.scorer.score(
                [self.query_text[q] for q, _ in todo], [self.doc_text[d] for _, d in todo]
            )
            if not np.isfinite(got).all():
                raise FloatingPointError(f"scorer {self.scorer.name} produced NaN/inf scores")
            self.cache.update(zip(todo, got.tolist(), strict=True))
        return np.array([self.cache[p] for p in pairs], dtype=np.float32)
