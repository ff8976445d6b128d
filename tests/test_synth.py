import json
import re
from collections import Counter
from pathlib import Path

import pytest

from curate.read.synth import QUERY_TEMPLATES, build_demo, write_demo_dataset

FILES = ["README.md", "corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_qrels(path: Path) -> list[tuple[str, str, int]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [(q, d, int(s)) for q, d, s in (line.split("\t") for line in lines[1:])]


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_is_byte_identical(tmp_path, demo_dir):
    again = write_demo_dataset(tmp_path / "again", seed=0)
    assert sorted(all_files(again)) == sorted(FILES)
    assert all_files(again) == all_files(demo_dir)


def test_different_seed_differs(tmp_path, demo_dir):
    other = all_files(write_demo_dataset(tmp_path / "other", seed=1))
    ours = all_files(demo_dir)
    assert all(other[f] != ours[f] for f in FILES)


def test_rewrite_replaces_atomically(tmp_path):
    out = write_demo_dataset(tmp_path / "d", seed=3, n_topics=2, docs_per_topic=20)
    (out / "stale.txt").write_text("left from an old run")
    write_demo_dataset(out, seed=3, n_topics=2, docs_per_topic=20)
    assert sorted(all_files(out)) == sorted(FILES)
    # No temporary or moved-aside folders are left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_counts_match_arguments_and_readme(demo_dir):
    corpus = read_jsonl(demo_dir / "corpus.jsonl")
    queries = read_jsonl(demo_dir / "queries.jsonl")
    train = read_qrels(demo_dir / "qrels/train.tsv")
    test = read_qrels(demo_dir / "qrels/test.tsv")
    assert len(corpus) == 8 * 60
    # 60 docs per topic = 53 primaries + 6 paraphrases + 1 copy; a quarter of primaries -> test.
    assert len({q for q, _, _ in test}) == 8 * round(0.25 * 53)
    assert 300 <= len({q for q, _, _ in train}) <= 500
    assert len(queries) == len({q for q, _, _ in train} | {q for q, _, _ in test})
    readme = (demo_dir / "README.md").read_text()
    stated = dict(re.findall(r"(\w+[\w.]*): (\d+) (?:documents|queries)", readme))
    assert int(stated["corpus.jsonl"]) == len(corpus)
    assert int(stated["queries.jsonl"]) == len(queries)


def test_ids_exist_and_splits_are_disjoint(demo_dir):
    doc_ids = [r["_id"] for r in read_jsonl(demo_dir / "corpus.jsonl")]
    query_ids = [r["_id"] for r in read_jsonl(demo_dir / "queries.jsonl")]
    assert len(set(doc_ids)) == len(doc_ids) and len(set(query_ids)) == len(query_ids)
    train = read_qrels(demo_dir / "qrels/train.tsv")
    test = read_qrels(demo_dir / "qrels/test.tsv")
    for q, d, s in train + test:
        assert q in set(query_ids) and d in set(doc_ids) and s in (1, 2)
    assert not {q for q, _, _ in train} & {q for q, _, _ in test}
    # Held-out queries are about documents no train query is judged on.
    assert not {d for _, d, _ in train} & {d for _, d, _ in test}


def test_realistic_structure(demo_dir):
    corpus = read_jsonl(demo_dir / "corpus.jsonl")
    queries = read_jsonl(demo_dir / "queries.jsonl")
    qrels = read_qrels(demo_dir / "qrels/train.tsv") + read_qrels(demo_dir / "qrels/test.tsv")
    assert all(r["text"].strip() and r["title"].strip() for r in corpus)
    assert all(r["text"].strip() for r in queries)
    assert max(Counter(r["text"] for r in corpus).values()) >= 2, "no exact duplicate texts"
    assert max(Counter(d for _, d, _ in qrels).values()) >= 2, "no doc shared by two queries"
    positives = Counter(q for q, _, _ in qrels)
    assert {1, 2, 3} <= set(positives.values())
    assert {s for _, _, s in qrels} == {1, 2}


def test_queries_never_use_doc_topic_words(demo_dir):
    # The vocabulary gap is what fine-tuning learns; a leak would make the demo uninformative.
    corpus = read_jsonl(demo_dir / "corpus.jsonl")
    doc_words = {w for r in corpus for w in re.findall(r"\b[a-z]+\b", r["text"])}
    template_words = set(re.findall(r"\b[a-z]+\b", " ".join(QUERY_TEMPLATES)))
    for r in read_jsonl(demo_dir / "queries.jsonl"):
        assert not set(re.findall(r"\b[a-z]+\b", r["text"])) & (doc_words - template_words)


@pytest.mark.parametrize(
    "kwargs", [{"n_topics": 0}, {"n_topics": 11}, {"docs_per_topic": 5}, {"test_fraction": 1.0}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_demo(**kwargs)
