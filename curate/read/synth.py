"""The bundled demo dataset: a small BEIR-layout retrieval set generated from a seed.

No retrieval dataset can be installed from a package registry and the project ships no copied
data, so the fresh-machine demo runs on text this module writes. It is built to behave like real
data where the pipeline cares:

- topics: every document and query belongs to one of ``n_topics`` topics with its own vocabulary;
- hard negatives: an entity name (a made-up proper noun) recurs in several topics, so documents
  about the same entity in other topics share the query's most distinctive token;
- near duplicates: some documents paraphrase another (same entity and words, new sentences) and a
  few are exact copies of another's text under a new id;
- shared positives: documents have 0-3 queries, and a query's positives include the copy (score
  2) and the paraphrase (score 1) of its source document (score 2);
- unlabelled positives: in the train split half the paraphrases are left out of the qrels, as
  crowd labels miss near duplicates in real data; the test split labels every one;
- held-out evaluation: test queries are about documents that no train query points to.

What makes fine-tuning pay off is a consistent vocabulary gap: queries never use a topic word
itself but a fixed made-up alias of it (``rudder`` -> ``tervisk``), so an off-the-shelf model
matches the entity but cannot tell which of its topics the query is about. Training teaches the
aliases, and they carry over to test queries about unseen documents because aliases belong to
topic words, not to documents.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.files import atomic_dir

log = logging.getLogger(__name__)

TOPICS: dict[str, str] = {
    "aeronautics": "aircraft wing fuselage rudder propeller runway altitude cockpit turbine glider "
    "hangar aileron pilot airframe thrust airspeed jetliner helicopter autopilot flap cabin "
    "airfield takeoff navigation",
    "cooking": "recipe oven skillet garlic saucepan dough pastry broth spice butter flour marinade "
    "knife roast kitchen soup sauce onion pepper vinegar bread noodle stew yeast",
    "finance": "bond equity dividend portfolio loan mortgage interest inflation budget ledger "
    "audit asset liability investor stock currency bank credit pension revenue tax hedge broker "
    "deposit",
    "medicine": "patient vaccine surgery diagnosis clinic nurse antibiotic fever tumor therapy "
    "symptom prescription hospital infection dose cardiology allergy virus wound physician "
    "insulin pharmacy scan fracture",
    "music": "melody guitar piano rhythm chord orchestra violin drum tempo concert harmony lyrics "
    "album choir saxophone trumpet symphony tune bass opera composer song jazz cello",
    "sports": "football goalkeeper stadium referee tennis marathon coach tournament basketball "
    "sprint league medal cricket umpire athlete racket championship swimmer penalty jersey "
    "hockey rugby cyclist trophy",
    "geology": "rock mineral volcano earthquake fossil granite sediment crystal magma erosion "
    "canyon glacier basalt quartz limestone fault lava cave shale geyser boulder strata bedrock "
    "sandstone",
    "law": "court judge lawyer contract verdict statute appeal jury attorney lawsuit plaintiff "
    "defendant evidence testimony tribunal clause treaty patent license custody warrant "
    "parliament regulation lease",
    "astronomy": "planet telescope galaxy comet asteroid orbit nebula star moon eclipse meteor "
    "observatory satellite supernova constellation cosmos rocket astronaut quasar gravity "
    "spacecraft pulsar starlight meteorite",
    "gardening": "soil compost seed tulip shovel greenhouse fertilizer orchard weed rose pruning "
    "mulch bulb seedling vegetable lawn irrigation shrub orchid harvest trowel flowerbed vine "
    "sapling",
}

# {e}: entity, {a} {b}: topic words. Sentence templates for documents, then for queries.
DOC_OPENERS = (
    "{e} is best known for its {a} and its {b}.",
    "At {e}, the {a} is tied closely to the {b}.",
    "The {a} used by {e} was rebuilt around a new {b}.",
    "Reports from {e} describe how the {a} shapes the {b}.",
    "Every {a} at {e} is checked against the {b}.",
    "{e} keeps a careful record of each {a} and {b}.",
)
DOC_SENTENCES = (
    "The {a} and the {b} are handled by the same small team.",
    "A well kept {a} often matters more than the {b}.",
    "Its {a} was praised, while the {b} drew complaints.",
    "Few places pair a {a} with a {b} so well.",
    "Visitors mostly ask about the {a}, less about the {b}.",
    "Over the years the {a} changed far more than the {b}.",
    "Critics point to the {a} rather than the {b}.",
)
QUERY_TEMPLATES = (
    "{e} {a} {b}",
    "what {a} does {e} use with its {b}",
    "how is the {a} of {e} related to the {b}",
    "{a} and {b} at {e}",
    "which {b} goes with the {e} {a}",
    "{e} {a} compared to {b}",
)
_ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl tr st sk th".split()
_VOWELS = "a e i o u a e o".split()
_CODAS = ["", "", "n", "r", "l", "s", "k", "m", "sk", "th"]

PARAPHRASE_FRACTION = 0.1  # of a topic's documents
DUPLICATES_PER_TOPIC = 1


@dataclass(frozen=True)
class Doc:
    topic: int
    entity: str
    words: tuple[str, ...]
    title: str
    text: str
    source: int | None = None  # index of the document this one paraphrases or copies
    exact: bool = False


def _pseudo_word(rng: np.random.Generator, syllables: int) -> str:
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]]
    parts += [
        _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
        for _ in range(syllables - 1)
    ]
    return "".join(parts) + _CODAS[rng.integers(len(_CODAS))]


def _unique_words(rng: np.random.Generator, n: int, taken: set[str], syllables: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _pseudo_word(rng, syllables)
        # Short pseudo-words are often real ones (e.g. "bone"); those would leak meaning.
        if w not in taken and len(w) >= 5:
            taken.add(w)
            out.append(w)
    return out


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str], k: int) -> list[str]:
    return [items[i] for i in rng.permutation(len(items))[:k]]


def _doc_text(rng: np.random.Generator, entity: str, words: tuple[str, ...]) -> str:
    """2-4 sentences, two topic words each; the entity opens the text."""
    order = [words[i] for i in rng.permutation(len(words))]
    pairs = [order[i : i + 2] for i in range(0, len(order) - 1, 2)]
    first = DOC_OPENERS[rng.integers(len(DOC_OPENERS))]
    rest = _pick(rng, DOC_SENTENCES, len(pairs) - 1)
    sentences = [first.format(e=entity, a=pairs[0][0], b=pairs[0][1])]
    sentences += [t.format(a=a, b=b) for t, (a, b) in zip(rest, pairs[1:], strict=True)]
    return " ".join(sentences)


@dataclass(frozen=True)
class Demo:
    """The generated set: rows as written, qrels per split as (query id, doc id, score)."""

    corpus: list[dict[str, str]]
    queries: list[dict[str, str]]
    qrels: dict[str, list[tuple[str, str, int]]]


def _make_docs(
    rng: np.random.Generator, n_topics: int, docs_per_topic: int, entities: list[str]
) -> list[Doc]:
    """Per topic: primaries first, then paraphrases and exact copies of some of them."""
    n_para = round(PARAPHRASE_FRACTION * docs_per_topic)
    n_primary = docs_per_topic - n_para - DUPLICATES_PER_TOPIC
    docs: list[Doc] = []
    for t, name in enumerate(list(TOPICS)[:n_topics]):
        vocab = tuple(TOPICS[name].split())
        start = len(docs)
        for e in _pick(rng, entities, n_primary):
            words = tuple(_pick(rng, vocab, 2 * int(rng.integers(2, 5))))
            docs.append(Doc(t, e, words, f"{e} {words[0]}", _doc_text(rng, e, words)))
        # Copies come from paraphrased docs too, so some queries get three positives.
        sources = [start + int(i) for i in rng.permutation(n_primary)[:n_para]]
        for s in sources:
            src = docs[s]
            text = _doc_text(rng, src.entity, src.words)
            while text == src.text:
                text = _doc_text(rng, src.entity, src.words)
            docs.append(Doc(t, src.entity, src.words, f"{src.entity} {src.words[1]}", text, s))
        for s in sources[:DUPLICATES_PER_TOPIC]:
            src = docs[s]
            docs.append(Doc(t, src.entity, src.words, src.title, src.text, s, exact=True))
    return docs


def _queries_per_doc(rng: np.random.Generator, n: int) -> list[int]:
    """0-3 queries per document, in a fixed proportion: a tenth get 3, a quarter 2, half 1."""
    counts = [
        3 if i < n / 10 else 2 if i < n * 0.35 else 1 if i < n * 0.85 else 0 for i in range(n)
    ]
    return [counts[i] for i in rng.permutation(n)]


def _query_text(rng: np.random.Generator, doc: Doc, alias: dict[str, str]) -> str:
    a, b = _pick(rng, doc.words, 2)
    template = QUERY_TEMPLATES[rng.integers(len(QUERY_TEMPLATES))]
    return template.format(e=doc.entity, a=alias[a], b=alias[b])


def _make_queries(
    rng: np.random.Generator,
    docs: list[Doc],
    n_topics: int,
    test_fraction: float,
    alias: dict[str, str],
) -> list[tuple[str, str, dict[int, int]]]:
    """(split, text, {doc index: score}) per query. Test queries are about primaries no train
    query points to, so evaluation measures transfer, not memorised documents."""
    copies: dict[int, list[int]] = {}
    for i, d in enumerate(docs):
        if d.source is not None:
            copies.setdefault(d.source, []).append(i)
    seen: set[str] = set()
    queries: list[tuple[str, str, dict[int, int]]] = []
    for t in range(n_topics):
        primaries = [i for i, d in enumerate(docs) if d.topic == t and d.source is None]
        n_test = max(1, round(test_fraction * len(primaries)))
        order = [primaries[i] for i in rng.permutation(len(primaries))]
        plan = [("test", i, 1) for i in order[:n_test]]
        counts = _queries_per_doc(rng, len(order) - n_test)
        plan += [("train", i, c) for i, c in zip(order[n_test:], counts, strict=True)]
        for split, i, count in plan:
            for _ in range(count):
                text = _query_text(rng, docs[i], alias)
                while text in seen:
                    text = _query_text(rng, docs[i], alias)
                seen.add(text)
                rels = {i: 2}
                for j in copies.get(i, []):
                    # Train labels miss half the paraphrases, as crowd labels do in real sets.
                    if docs[j].exact or split == "test" or rng.random() < 0.5:
                        rels[j] = 2 if docs[j].exact else 1
                queries.append((split, text, rels))
    return queries


def build_demo(
    seed: int = 0, n_topics: int = 8, docs_per_topic: int = 60, test_fraction: float = 0.25
) -> Demo:
    """The demo set in memory; see the module docstring for what it contains."""
    if not 1 <= n_topics <= len(TOPICS):
        raise ValueError(f"n_topics must be in 1..{len(TOPICS)}, got {n_topics}")
    if docs_per_topic < 10:
        raise ValueError(f"docs_per_topic must be >= 10, got {docs_per_topic}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    vocab = sorted(w for name in list(TOPICS)[:n_topics] for w in TOPICS[name].split())
    taken = set(vocab)
    alias = dict(zip(vocab, _unique_words(rng, len(vocab), taken, 2), strict=True))
    n_primary = docs_per_topic - round(PARAPHRASE_FRACTION * docs_per_topic) - DUPLICATES_PER_TOPIC
    # About four topics per entity: enough same-entity hard negatives, few enough to rank.
    n_entities = max(n_primary, -(-n_topics * n_primary // 4))
    entities = [w.capitalize() for w in _unique_words(rng, n_entities, taken, 2)]
    docs = _make_docs(rng, n_topics, docs_per_topic, entities)
    queries = _make_queries(rng, docs, n_topics, test_fraction, alias)
    doc_ids = [""] * len(docs)
    for new, old in enumerate(rng.permutation(len(docs))):
        doc_ids[old] = f"doc{new:04d}"
    corpus = sorted(
        ({"_id": doc_ids[i], "title": d.title, "text": d.text} for i, d in enumerate(docs)),
        key=lambda r: r["_id"],
    )
    rows, qrels = [], {"train": [], "test": []}
    for new, old in enumerate(rng.permutation(len(queries))):
        split, text, rels = queries[old]
        qid = f"q{new:04d}"
        rows.append({"_id": qid, "text": text})
        qrels[split] += [(qid, doc_ids[j], s) for j, s in sorted(rels.items())]
    for split in qrels:
        qrels[split].sort(key=lambda r: (r[0], r[1]))
    return Demo(corpus, rows, qrels)


README = """# curate demo dataset

Generated by `curate.read.synth.write_demo_dataset(seed={seed}, n_topics={n_topics},
docs_per_topic={docs_per_topic}, test_fraction={test_fraction})`; the same arguments always give
byte-identical files. It is synthetic: made-up entity names and query-side aliases of real topic
words, written from templates. It stands in for a real retrieval set on a fresh machine and says
nothing about real-world quality.

- corpus.jsonl: {n_docs} documents (`_id`, `title`, `text`) in {n_topics} topics, including
  paraphrases and exact copies of other documents.
- queries.jsonl: {n_queries} queries (`_id`, `text`), train and test together.
- qrels/train.tsv: {n_train} queries, {n_train_rows} judgements; qrels/test.tsv: {n_test} queries,
  {n_test_rows} judgements. Score 2: the document the query was written from or an exact copy of
  it; score 1: a paraphrase of it. Train judgements leave out half the paraphrases, on purpose.

Queries name topic words by fixed made-up aliases, so an untrained model finds the entity but not
the topic; fine-tuning on the train queries teaches the aliases, which test queries (about other
documents) share.
"""


def write_demo_dataset(
    out_dir: Path,
    seed: int = 0,
    n_topics: int = 8,
    docs_per_topic: int = 60,
    test_fraction: float = 0.25,
) -> Path:
    """Write the demo set as a BEIR folder at ``out_dir`` and return it.

    The folder is written beside ``out_dir`` under a temporary name and renamed into place, so a
    reader never sees half a dataset; an existing ``out_dir`` is replaced.
    """
    demo = build_demo(seed, n_topics, docs_per_topic, test_fraction)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")) as tmp:
        counts = _write_demo(demo, tmp, seed, n_topics, docs_per_topic, test_fraction)
    log.info("demo dataset at %s: %s", out_dir, counts)
    return out_dir


def _write_demo(
    demo, tmp: Path, seed: int, n_topics: int, docs_per_topic: int, test_fraction: float
) -> dict:
    (tmp / "qrels").mkdir(parents=True)
    _write_lines(tmp / "corpus.jsonl", [json.dumps(r, ensure_ascii=False) for r in demo.corpus])
    _write_lines(tmp / "queries.jsonl", [json.dumps(r, ensure_ascii=False) for r in demo.queries])
    counts = {"n_docs": len(demo.corpus), "n_queries": len(demo.queries)}
    for split, rows in demo.qrels.items():
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in rows]
        _write_lines(tmp / "qrels" / f"{split}.tsv", lines)
        counts[f"n_{split}"] = len({q for q, _, _ in rows})
        counts[f"n_{split}_rows"] = len(rows)
    args = {"seed": seed, "n_topics": n_topics, "docs_per_topic": docs_per_topic}
    readme = README.format(**args, test_fraction=test_fraction, **counts)
    (tmp / "README.md").write_text(readme, encoding="utf-8")
    return counts


def _write_lines(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
