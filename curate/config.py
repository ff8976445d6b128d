"""Run configuration: one frozen dataclass per stage, loaded from YAML and validated up front.

Every key is checked before any work starts: unknown keys get a did-you-mean, values are checked
against the field's type, its allowed choices (``Literal``) and its range (``field(metadata=...)``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curate.errors import ConfigError


def _range(lo: float | None = None, hi: float | None = None, **kw: Any) -> dict:
    return {"lo": lo, "hi": hi, **kw}


@dataclass(frozen=True)
class ColumnsConfig:
    """Column names of the input tables; the defaults are BEIR's."""

    doc_id: str = "_id"
    title: str = "title"
    text: str = "text"
    query_id: str = "_id"
    query_text: str = "text"
    qrels_query_id: str = "query-id"
    qrels_doc_id: str = "corpus-id"
    qrels_score: str = "score"
    # A column of precomputed embeddings (list of floats) in the corpus and queries Parquet
    # files: set, curate indexes and mines with these vectors and skips the embed stage.
    vector: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus, queries and known positives are.

    ``path`` is a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or ``demo`` for the
    generated demo set. ``corpus``/``queries``/``qrels_dir`` override single files (Parquet or
    JSONL). Each may be a URL (s3://, gs://, ...: read through fsspec, see ``storage``).
    """

    path: str = "demo"
    corpus: str | None = None
    queries: str | None = None
    qrels_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = "test"
    empty_text: Literal["error", "skip"] = "error"
    max_train_queries: int | None = field(default=None, metadata=_range(1))
    # Which judged positives become training rows. Every positive (score > 0) stays a known
    # positive either way: masked in the trainer, never mined as a negative. above_lowest: on
    # graded qrels (two or more positive scores in the train split) all but the lowest grade,
    # the marginal one (NFCorpus's indirect links, Cranfield's "minimum interest"); top_grade:
    # each query's positives at its highest score; min_score: those scoring at least
    # train_min_score. A query left without one trains no row (it stays known). Binary qrels:
    # all four are the same.
    train_positives: Literal["all", "above_lowest", "top_grade", "min_score"] = "above_lowest"
    train_min_score: float = 1.0
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)


@dataclass(frozen=True)
class EmbedConfig:
    model: str = "all-MiniLM-L6-v2"
    max_length: int = field(default=256, metadata=_range(8, 8192))
    query_prefix: str = ""
    doc_prefix: str = ""
    pooling: Literal["auto", "mean", "cls"] = "auto"
    # Batches are cut by padded tokens (rows x longest row), not by a row count.
    token_budget: int = field(default=8192, metadata=_range(64))
    # auto: bf16 autocast on CUDA; on CPU bf16 weights where the CPU has native bf16 (AVX512-BF16
    # or AMX), else fp32 (docs/benchmarks.md). int8: dynamic quantisation of the linear layers
    # (CPU only).
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = "auto"
    store_dtype: Literal["float32", "float16"] = "float32"
    # Texts per Dask task, in whole batches: batches are cut over all texts (curate/embed_plan.py),
    # so this splits the work and never changes a vector.
    partition_size: int = field(default=1024, metadata=_range(1))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class IndexConfig:
    # "auto": Flat below `flat_max` vectors, IVF-PQ above; else any faiss index_factory string;
    # "torch-exact": flat files searched by matmul in torch (curate/exact.py), on CUDA when torch
    # sees it (use_gpu), no recall loss and no cap on mine.top_k.
    factory: str = "auto"
    flat_max: int = field(default=1_000_000, metadata=_range(1))
    nprobe: int = field(default=32, metadata=_range(1))
    train_sample: int = field(default=200_000, metadata=_range(1000))
    # The auto IVF-PQ re-ranks k_factor x k candidates with these finer codes (faiss "Refine(...)"):
    # PQ alone scrambles the order of close neighbours (recall@100 0.56-0.71 on clustered 384-d
    # vectors, 0.98 with SQ8 re-ranking: docs/benchmarks.md). None: PQ alone, a quarter the memory.
    refine: str | None = "SQ8"
    k_factor: float = field(default=4.0, metadata=_range(1.0, 1000.0))
    # >1: one index per contiguous shard of the corpus (shared quantizer), each searched by its
    # own Dask task per query block; hits merged to the exact global top-k (flat: = unsharded).
    shards: int = field(default=1, metadata=_range(1))
    # Queries per faiss call. Mining searches on a fixed grid of this many, whatever
    # mine.query_partition, since BLAS scores depend in their last bits on the call's query count.
    query_block: int = field(default=4096, metadata=_range(1))
    use_gpu: Literal["auto", "never", "always"] = "auto"
    # Recall guard (approximate indexes only): recall@top_k against brute force on a sample of
    # queries; below the floor the run fails or doubles nprobe/efSearch until it holds.
    recall_floor: float = field(default=0.95, metadata=_range(0.0, 1.0))
    recall_action: Literal["fail", "raise_nprobe"] = "fail"
    recall_sample: int = field(default=1000, metadata=_range(1))


@dataclass(frozen=True)
class MineConfig:
    top_k: int = field(default=100, metadata=_range(1, 10_000))
    num_negatives: int = field(default=7, metadata=_range(1, 1000))
    # Backups kept after the num_negatives: stage 5 swaps one in when a negative is already in
    # the row's batch (topic batches make that common: similar queries share hard negatives).
    spare_negatives: int = field(default=7, metadata=_range(0, 1000))
    range_min: int = field(default=0, metadata=_range(0))
    range_max: int = field(default=100, metadata=_range(1))
    # Drop candidates scoring above max_relative * score(positive) (NV-Retriever TopK-PercPos).
    max_relative: float | None = field(default=0.95, metadata=_range(0.0, 10.0))
    # Which of the query's known positives sets that ceiling, for all of its pairs alike (a doc
    # is then suspect for every pair of the query or for none, as forbidden pairs and the mask are
    # per query): "best" keeps more negatives, "weakest" rejects more likely false negatives.
    # weakest by default: on many-positive data (NFCorpus, ~43 per query) the best positive's
    # ceiling let unlabelled positives through and training fell below the base model
    # (docs/quality.md); with one positive per query all three are the same.
    ceiling_from: Literal["best", "median", "weakest"] = "weakest"
    # Whose scores ceiling_from ranks: every known positive of the query, or only those that
    # became its training rows (data.train_positives): with graded qrels and above_lowest the
    # lowest grade then stays known (masked, forbidden) without lowering every ceiling to it.
    ceiling_over: Literal["known", "trained"] = "known"
    # A target false-negative rate (e.g. 0.01): max_relative is then chosen per dataset by hiding
    # each known positive in turn and counting how often it would be mined (curate/ceiling.py).
    calibrate_ceiling: float | None = field(default=None, metadata=_range(0.0, 1.0))
    near_dup_threshold: float = field(default=0.98, metadata=_range(-1.0, 1.0))
    # Jaccard of normalised word 3-grams with a known positive above this -> ngram_duplicate.
    ngram_threshold: float | None = field(default=0.5, metadata=_range(0.0, 1.0))
    strategy: Literal["top", "random"] = "top"
    query_partition: int = field(default=2048, metadata=_range(1))


@dataclass(frozen=True)
class DedupConfig:
    # Exact duplicates (normalised text) are always merged. Semantic (SemDeDup): also merge docs
    # whose embeddings' cosine exceeds this; None turns it off.
    semantic_threshold: float | None = field(default=None, metadata=_range(0.0, 1.0))
    clusters: int = field(default=0, metadata=_range(0))  # k-means clusters; 0: N / 1000


@dataclass(frozen=True)
class BatchConfig:
    batch_size: int = field(default=32, metadata=_range(2, 65536))
    # spread: at most topic_cap rows of one topic (query cluster) per batch, topics mixed evenly,
    # so one topic's unlabelled relevant documents do not become each other's negatives;
    # cluster: same_topic x batch_size rows from one topic (TAS-Balanced); off: random order.
    topics: Literal["spread", "cluster", "off"] = "spread"
    topic_cap: int = field(default=0, metadata=_range(0))  # 0: ceil(batch_size / n_topics)
    # Share of each batch drawn from one topic cluster (topics: cluster); the rest from all topics.
    same_topic: float = field(default=0.75, metadata=_range(0.0, 1.0))
    # Most rows (positives) of one query in a batch; 0: no cap.
    max_rows_per_query: int = field(default=0, metadata=_range(0))
    n_topics: int = field(default=0, metadata=_range(0))  # 0: about sqrt(#queries)
    # Rows whose known positives collide in a batch: "mask" keeps them together and records the
    # mask (known_pos_ids); "separate" never puts them in one batch.
    shared_positives: Literal["mask", "separate"] = "mask"
    batches_per_shard: int = field(default=64, metadata=_range(1))
    drop_last: bool = False


@dataclass(frozen=True)
class TrainConfig:
    enabled: bool = True
    epochs: int = field(default=1, metadata=_range(1))
    max_steps: int | None = field(default=None, metadata=_range(1))
    lr: float = field(default=2e-5, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=0.01, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=10, metadata=_range(0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    temperature: float = field(default=0.05, metadata=_range(1e-4, 10.0))
    learn_temperature: bool = False
    symmetric: bool = False
    max_length: int = field(default=128, metadata=_range(8, 8192))
    checkpoint_every: int = field(default=50, metadata=_range(1))
    # GradCache chunk size; 0 embeds the whole batch with graph at once.
    chunk_size: int = field(default=0, metadata=_range(0))
    # standard InfoNCE; decoupled (positive out of the denominator); multi_positive (SupCon: every
    # known positive present in the batch is a target instead of being masked).
    loss: Literal["standard", "decoupled", "multi_positive"] = "standard"
    # Distillation from the shards' scores (pos_score, neg_scores; a teacher's when rescored):
    # KL between softmaxes over [pos + own negatives], or MSE on the cosine scores.
    distill: Literal["none", "kl", "mse"] = "none"
    distill_weight: float = field(default=1.0, metadata=_range(0.0))
    teacher_temperature: float = field(default=0.05, metadata=_range(1e-4, 100.0))
    # false: ablation without the false-negative mask (known positives and forbidden pairs stay in
    # the denominator); only repeats of a column are still masked.
    mask: bool = True
    # auto: CUDA when torch sees it (bf16 autocast; fp16 with a grad scaler where bf16 is
    # unsupported), else CPU fp32; cuda without a CUDA device is an error at the start of training.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Data-parallel processes, each taking a slice of every batch (on CUDA one GPU each); >1
    # launches them itself. Under torchrun the world size comes from torchrun instead.
    processes: int = field(default=1, metadata=_range(1, 1024))


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    max_queries: int | None = field(default=None, metadata=_range(1))


@dataclass(frozen=True)
class ClusterConfig:
    # Address of an existing Dask scheduler; None starts a LocalCluster.
    scheduler: str | None = None
    n_workers: int | None = field(default=None, metadata=_range(1))
    threads_per_worker: int | None = field(default=None, metadata=_range(1))
    # A LocalCluster of worker processes, or one worker in this process. auto: in-process when
    # the run has at most in_process_max texts (corpus + queries) and n_workers is not set:
    # on a small corpus, starting processes and loading the model in each costs more than it saves.
    workers: Literal["auto", "processes", "in_process"] = "auto"
    in_process_max: int = field(default=50_000, metadata=_range(0))


@dataclass(frozen=True)
class FnCheckConfig:
    """Targeted false-negative check: a stronger scorer judges the kept negatives whose miner
    score is within ``band`` x the positive's; confirmed when teacher(q, neg) >= teacher(q, pos)
    - margin."""

    scorer: str | None = None  # local model folder (embedder: also the packaged name); None: off
    kind: Literal["cross_encoder", "embedder"] = "cross_encoder"
    band: tuple[float, float] = (0.85, 1.0)
    confirm_margin: float = field(default=0.0, metadata=_range(-1e6, 1e6))
    action: Literal["drop", "relabel"] = "drop"  # drop: forbidden; relabel: extra known positive
    max_length: int = field(default=256, metadata=_range(8, 8192))

    def __post_init__(self) -> None:
        if not 0 <= self.band[0] <= self.band[1]:
            detail = f"{list(self.band)} must be [lo, hi] with 0 <= lo <= hi"
            raise ConfigError(f"fncheck.band: {detail}", ("fncheck.band",), "fncheck.band", detail)


@dataclass(frozen=True)
class TeacherConfig:
    """Rescore positives and kept negatives with this scorer (shard pos_score/neg_scores)."""

    scorer: str | None = None  # local model folder (embedder: also the packaged name); None: off
    kind: Literal["cross_encoder", "embedder"] = "cross_encoder"
    max_length: int = field(default=256, metadata=_range(8, 8192))


# fsspec option names that hold secrets: the config is copied into the manifest, which travels.
_SECRET_OPTIONS = {"key", "secret", "password", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "account_key", "sas_token", "client_secret",
                   "connection_string"}  # fmt: skip


@dataclass(frozen=True)
class StorageConfig:
    """How URLs in data.*, output_dir and cache_dir are reached (curate/storage.py)."""

    # Per protocol, keyword arguments of its fsspec filesystem, e.g. {s3: {endpoint_url: ...}};
    # credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from here.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Where a URL output_dir or cache_dir is written before upload, one folder per URL;
    # None: ~/.cache/curate/staging ($XDG_CACHE_HOME/curate/staging).
    staging_dir: str | None = None

    def __post_init__(self) -> None:
        for protocol, kwargs in self.options.items():
            if bad := sorted(_secrets(kwargs)):
                where = f"storage.options.{protocol}"
                detail = (f"{bad} hold credentials, which the manifest would copy; set them in "
                          "the environment instead (for s3: AWS_ACCESS_KEY_ID, "
                          "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")  # fmt: skip
                raise ConfigError(f"{where}: {detail}", (where,), where, detail)


def _secrets(tree: Any) -> set[str]:
    if not isinstance(tree, dict):
        return set()
    found = {str(k) for k in tree if str(k).lower() in _SECRET_OPTIONS}
    return found.union(*(_secrets(v) for v in tree.values()))


@dataclass(frozen=True)
class Config:
    # A folder, or a URL (s3://bucket/run, ...: written in a staging folder, then uploaded).
    output_dir: str = "runs/demo"
    # Write into an output_dir that is neither empty nor a curate run (curate.outdir): files of
    # the names curate writes are replaced; off, such a folder is refused before any work.
    overwrite: bool = False
    cache_dir: str | None = None  # embeddings cache (a folder or a URL); None: <output_dir>/cache
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    fncheck: FnCheckConfig = field(default_factory=FnCheckConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building and validating -------------------------------------------------------------


def _bad(where: str, detail: str) -> ConfigError:
    """An error about one key (``where``: its dotted path); the loader names its source."""
    return ConfigError(f"{where}: {detail}", (where,), where, detail)


def _check_value(where: str, value: Any, hint: Any, meta: typing.Mapping) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(where, value, inner, meta)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _bad(where, f"expected a list of {len(args)} values, got {value!r}")
        items = enumerate(zip(value, args, strict=True))
        return tuple(_check_value(f"{where}[{i}]", v, a, meta) for i, (v, a) in items)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise _bad(where, f"{value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, f"expected a mapping, got {value!r}")
        keys, values = typing.get_args(hint)
        return {_check_value(where, k, keys, {}): _check_value(f"{where}.{k}", v, values, {})
                for k, v in value.items()}  # fmt: skip
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _bad(where, f"expected a mapping of keys, got {value!r}")
        return build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise _bad(where, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise _bad(where, f"expected a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise _bad(where, f"expected a string, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise _bad(where, f"{value!r} is out of range [{lo}, {hi}]")
    return value


def build(cls: type, values: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating every key and value.
    ``where``: the dotted path of ``values`` in the config ("" at the top)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
            detail = f"unknown key {key!r}" + (f" in {where}" if where else "") + hint
            raise ConfigError(f"config: {detail}", (path,), "", detail)
        kwargs[key] = _check_value(path, value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``mine.num_negatives=7`` -> ("mine.num_negatives", 7); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. mine.num_negatives=7")
    key, raw = text.split("=", 1)
    return key.strip(), _safe_yaml(raw, f"--set {text!r}") if raw.strip() else ""


def _safe_yaml(text: str, where: str) -> Any:
    """Plain YAML only (the safe loader: no Python tags); a syntax error or a tag names
    ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{where}: not plain YAML ({' '.join(str(err).split())}); curate reads configs with "
            "the safe loader, so tags such as !!python/... are refused"
        ) from None


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (safe loader only) and apply ``KEY=VALUE`` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass an existing YAML file")
        tree = _safe_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return from_tree(tree, overrides, str(path) if path else "built-in defaults")


def config_from_dict(tree: dict) -> Config:
    return from_tree(tree)


def from_tree(tree: dict, overrides: typing.Sequence[str] = (), source: str = "config") -> Config:
    """A parsed config (``source``: the YAML file it came from) plus ``KEY=VALUE`` overrides ->
    a validated Config: every value, then the settings that must agree (curate.config_rules).
    An error names where the value came from: ``--set KEY=VALUE``, or ``source``."""
    from curate import config_rules

    tree = copy.deepcopy(tree)  # the caller's mapping is left as it was
    given = set(_dotted(tree))  # keys the source itself sets, before any override
    sets: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
        sets[key] = item
    try:
        cfg = build(Config, tree)
        config_rules.check(cfg)
    except ConfigError as err:
        raise _located(err, source, sets, given) from None
    return cfg


def _dotted(tree: dict, prefix: str = "") -> typing.Iterator[str]:
    for key, value in tree.items():
        yield prefix + str(key)
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")


def _located(err: ConfigError, source: str, sets: dict[str, str], given: set[str]) -> ConfigError:
    """``err`` prefixed with where its keys were set: the ``--set`` that set them, else the file."""
    if not err.keys:
        return err

    def origin(key: str) -> str | None:
        for k, item in sets.items():
            if key == k or key.startswith((k + ".", k + "[")):
                return f"--set {item}"
        return source if key in given or key.split("[")[0] in given else None

    origins = [o for o in dict.fromkeys(origin(k) for k in err.keys) if o]
    if len(err.keys) == 1 and origins and origins[0].startswith("--set "):
        message = f"{origins[0]}: {err.detail}"  # the --set names the key already
    else:
        where = f"{err.where}: " if err.where else ""
        message = f"{', '.join(origins) or source}: {where}{err.detail}"
    return ConfigError(message, err.keys, err.where, err.detail)
