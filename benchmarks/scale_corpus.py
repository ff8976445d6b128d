"""A synthetic BEIR folder of any size, with 384-d vectors given, written chunk by chunk.

The pipeline scale benchmark (``benchmarks/pipeline_scale.py``) needs corpora of 100k to 10M
documents without a model: the vectors come in the Parquet files (``data.columns.vector``), so
the embed stage is skipped and what is measured is the pipeline's own cost. The data has the
structure the stages care about:

- topics: ``n_topics ~ sqrt(N)`` unit centres mu_t; a doc of topic t is
  x = normalise(mu_t + sigma g), g ~ N(0, I/dim), so cos(x, mu_t) ~ 1/sqrt(1 + sigma^2) and an
  IVF index has clusters to find (as ``benchmarks/scale.py``'s ``clustered`` data);
- words: each topic has its own pseudo-words, mixed with words common to all topics, so texts of
  one topic share n-grams and the n-gram rule has something to read;
- near duplicates: every ``DUP_EVERY``-th doc repeats the previous doc's text with its first word
  changed (word 3-gram Jaccard ~0.87); half of them also take its vector plus a little noise
  (cosine ~0.999), the other half a fresh vector of the same topic;
- queries: N/10, query j has one positive doc inside the same chunk of the corpus, and its
  vector is normalise(x_pos + tau g), its text five words of the positive.

Chunk c (``chunk`` docs and ``chunk / 10`` queries) is drawn from ``rng([seed, c])`` alone, so a
chunk never needs another one and the corpus is never held whole: 10M x 384 float32 is 15 GB.
Files: corpus.parquet (_id, title, text, emb: fixed_size_list<float32>[384]), queries.parquet
(_id, text, emb), qrels/train.tsv (query-id, corpus-id, score), meta.json written last as the
completion marker; the folder is filled under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("scale_corpus")

DUP_EVERY = 20  # one near-duplicate per this many docs
QUERY_EVERY = 10  # one query per this many docs
WORDS_PER_DOC = 16
TOPIC_WORDS = 24  # own words per topic
COMMON_WORDS = 200  # words every topic uses
TOPIC_SHARE = 0.6  # of a doc's words drawn from its topic's own words
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70


@dataclass(frozen=True)
class CorpusSpec:
    n_docs: int
    dim: int = 384
    seed: int = 0
    chunk: int = 100_000  # docs per chunk and per Parquet row group
    sigma: float = 1.0  # doc spread around its topic centre
    tau: float = 0.6  # query spread around its positive
    n_topics: int = 0  # 0: round(sqrt(n_docs))

    def __post_init__(self) -> None:
        if self.n_docs < QUERY_EVERY * 10:
            raise ValueError(f"n_docs={self.n_docs}: need at least {QUERY_EVERY * 10} docs")
        if self.chunk % QUERY_EVERY or self.chunk < QUERY_EVERY:
            raise ValueError(f"chunk={self.chunk}: must be a positive multiple of {QUERY_EVERY}")

    @property
    def topics(self) -> int:
        return self.n_topics or max(2, round(self.n_docs**0.5))

    @property
    def n_queries(self) -> int:
        return sum(_chunk_rows(self, c)[1] for c in range(self.n_chunks))

    @property
    def n_chunks(self) -> int:
        return -(-self.n_docs // self.chunk)


def _chunk_rows(spec: CorpusSpec, c: int) -> tuple[int, int]:
    """(docs, queries) of chunk c."""
    docs = min(spec.chunk, spec.n_docs - c * spec.chunk)
    return docs, docs // QUERY_EVERY


def _word(n: int) -> list[str]:
    """n distinct pronounceable words: the base-70 syllable digits of i * 7919 mod 70^k (a
    bijection, 7919 being prime to 70), so neighbouring words do not share their endings."""
    k = 3
    while len(_SYLLABLES) ** k < n:
        k += 1
    space, b = len(_SYLLABLES) ** k, len(_SYLLABLES)
    out = []
    for v in ((np.arange(n, dtype=np.int64) * 7919 + 12345) % space).tolist():
        parts = []
        for _ in range(k):
            v, r = divmod(v, b)
            parts.append(_SYLLABLES[r])
        out.append("".join(parts))
    return out


def vocabulary(spec: CorpusSpec) -> pa.Array:
    """Topic t's own words at [t * TOPIC_WORDS, (t + 1) * TOPIC_WORDS), then the common ones."""
    n = spec.topics * TOPIC_WORDS + COMMON_WORDS
    return pa.array(_word(n), pa.string())


def centres(spec: CorpusSpec) -> np.ndarray:
    mu = np.random.default_rng([spec.seed, 1 << 30]).standard_normal(
        (spec.topics, spec.dim), np.float32
    )
    return mu / np.linalg.norm(mu, axis=1, keepdims=True)


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _noise(rng: np.random.Generator, rows: int, dim: int, scale: float) -> np.ndarray:
    g = rng.standard_normal((rows, dim), dtype=np.float32)
    g *= scale / np.sqrt(dim)
    return g


def _join(vocab: pa.Array, idx: np.ndarray) -> pa.Array:
    """Row r: the words vocab[idx[r]] joined by spaces ([rows, k] -> rows strings)."""
    rows, k = idx.shape
    offsets = pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32))
    words = vocab.take(pa.array(idx.ravel()))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, words), " ")


def _vectors_column(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1])


def make_chunk(spec: CorpusSpec, c: int, mu: np.ndarray, vocab: pa.Array):
    """-> (corpus table, queries table, qrels lines) of chunk c."""
    n, nq = _chunk_rows(spec, c)
    rng = np.random.default_rng([spec.seed, c])
    topic = rng.integers(0, spec.topics, n)
    dup = np.arange(n) % DUP_EVERY == DUP_EVERY - 1
    topic[dup] = topic[np.flatnonzero(dup) - 1]
    own = topic[:, None] * TOPIC_WORDS + rng.integers(0, TOPIC_WORDS, (n, WORDS_PER_DOC))
    common = spec.topics * TOPIC_WORDS + rng.integers(0, COMMON_WORDS, (n, WORDS_PER_DOC))
    words = np.where(rng.random((n, WORDS_PER_DOC)) < TOPIC_SHARE, own, common)
    words[dup] = words[np.flatnonzero(dup) - 1]
    words[dup, 0] = spec.topics * TOPIC_WORDS + rng.integers(0, COMMON_WORDS, int(dup.sum()))
    x = _noise(rng, n, spec.dim, spec.sigma) + mu[topic]
    same = np.flatnonzero(dup)[::2]  # half the duplicates also repeat the vector
    x[same] = x[same - 1] + _noise(rng, len(same), spec.dim, 0.05)
    x = _unit(x)

    first = c * spec.chunk
    doc_ids = pa.array([f"d{first + i:09d}" for i in range(n)])
    title = _join(vocab, np.stack([topic * TOPIC_WORDS, topic * TOPIC_WORDS + 1], axis=1))
    corpus = pa.table(
        {"_id": doc_ids, "title": title, "text": _join(vocab, words), "emb": _vectors_column(x)}
    )

    pos = np.arange(nq) * QUERY_EVERY + rng.integers(0, QUERY_EVERY, nq)
    q = _unit(x[pos] + _noise(rng, nq, spec.dim, spec.tau))
    q_first = c * (spec.chunk // QUERY_EVERY)
    q_ids = [f"q{q_first + j:08d}" for j in range(nq)]
    q_text = pc.binary_join_element_wise("what about", _join(vocab, words[pos, 2:7]), " ")
    queries = pa.table({"_id": pa.array(q_ids), "text": q_text, "emb": _vectors_column(q)})
    pos_ids = doc_ids.take(pa.array(pos)).to_pylist()
    qrels = [f"{a}\t{b}\t1\n" for a, b in zip(q_ids, pos_ids, strict=True)]
    return corpus, queries, qrels


def _writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    # Random floats do not compress: leave the vectors plain and compress only the text.
    comp = {name: ("none" if name == "emb" else "zstd") for name in schema.names}
    return pq.ParquetWriter(path, schema, compression=comp, use_dictionary=["title"])


def folder_for(work: Path, spec: CorpusSpec) -> Path:
    return Path(work) / f"corpus-n{spec.n_docs}-d{spec.dim}-s{spec.seed}"


def ensure_corpus(work: Path, spec: CorpusSpec) -> Path:
    """The corpus folder for ``spec`` under ``work``, generated only when no complete one (its
    meta.json matches ``spec``) is there."""
    out = folder_for(work, spec)
    meta = out / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["spec"] == asdict(spec):
        log.info("corpus %s: reused", out)
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "qrels").mkdir(parents=True)
    t0 = time.perf_counter()
    write_corpus(tmp, spec)
    (tmp / "meta.json").write_text(
        json.dumps(
            {
                "spec": asdict(spec),
                "n_queries": spec.n_queries,
                "topics": spec.topics,
                "generate_s": round(time.perf_counter() - t0, 2),
            },
            indent=1,
        )
        + "\n"
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info(
        "corpus %s: %d docs, %d queries in %.1fs",
        out,
        spec.n_docs,
        spec.n_queries,
        time.perf_counter() - t0,
    )
    return out


def write_corpus(folder: Path, spec: CorpusSpec) -> None:
    """Chunk by chunk into ``folder`` (which must exist with a qrels/ subfolder)."""
    mu, vocab = centres(spec), vocabulary(spec)
    corpus_w = queries_w = None
    with open(folder / "qrels" / "train.tsv", "w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        try:
            for c in range(spec.n_chunks):
                corpus, queries, lines = make_chunk(spec, c, mu, vocab)
                corpus_w = corpus_w or _writer(folder / "corpus.parquet", corpus.schema)
                queries_w = queries_w or _writer(folder / "queries.parquet", queries.schema)
                corpus_w.write_table(corpus, row_group_size=spec.chunk)
                queries_w.write_table(queries, row_group_size=spec.chunk)
                qrels.writelines(lines)
                log.info("chunk %d/%d written", c + 1, spec.n_chunks)
        finally:
            for w in (corpus_w, queries_w):
                if w is not None:
                    w.close()
