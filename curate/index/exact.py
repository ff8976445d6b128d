"""Exact inner-product top-k in torch: the corpus resident on one device, queries by matmul.

``index.factory: torch-exact``. The corpus stays on the device (bf16 on CUDA, fp32 on CPU);
each block of queries is multiplied against the corpus block by block and a running top-k is
merged across corpus blocks, so memory is query_block x corpus_block scores, never queries x docs,
and k has no cap (faiss on GPU stops at 2048). No recall loss: every document is scored. On CUDA
the scores are bf16 products accumulated in fp32 and rounded to bf16 (about 3 significant
digits), so near-ties may swap order against an fp32 search; on CPU it is fp32 throughout.

Imports torch and numpy only, so it runs where faiss is not installed (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# Bytes of one [query_block, corpus_block] score tile: the working memory of a search.
TILE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}


def exact_device(pref: str) -> torch.device:
    """``index.use_gpu`` for the torch search: auto -> CUDA when torch sees it."""
    cuda = torch.cuda.is_available()
    if pref == "always" and not cuda:
        from curate.errors import ConfigError

        raise ConfigError(
            "index.use_gpu: 'always' but torch sees no CUDA device; set auto or never"
        )
    return torch.device("cuda" if cuda and pref != "never" else "cpu")


def _plain_f32(a: np.ndarray) -> bool:
    return a.dtype == np.float32 and a.flags.c_contiguous and not isinstance(a, np.memmap)


class ExactSearch:
    """Top-k by inner product over ``vectors`` [N, D] (numpy or torch), held on ``device``."""

    def __init__(self, vectors: np.ndarray, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, chunk: int = 1 << 16,
                 owner: object = None) -> None:  # fmt: skip
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        n, self.dim = vectors.shape
        # The corpus below may be a view of memory ``vectors`` does not own (a faiss index's
        # storage): hold the owner, or the index is freed and the view reads garbage.
        self._owner = vectors if owner is None else owner
        if isinstance(vectors, torch.Tensor):  # e.g. generated on the device already
            self.corpus = vectors.to(self.device, self.dtype)
        elif self.device.type == "cpu" and self.dtype == torch.float32 and _plain_f32(vectors):
            self.corpus = torch.from_numpy(vectors)  # [N, D], no second copy on the CPU
        else:
            self.corpus = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
            for s in range(0, n, chunk):  # chunked copy: a memory map is never read whole
                part = np.ascontiguousarray(vectors[s : s + chunk], dtype=np.float32)
                self.corpus[s : s + len(part)] = torch.from_numpy(part).to(self.device, self.dtype)
        log.info("exact search over %d vectors of dim %d on %s (%s)", n, self.dim, self.device,
                 self.dtype)  # fmt: skip

    @property
    def ntotal(self) -> int:
        return len(self.corpus)

    @property
    def d(self) -> int:  # faiss's name, for index.check_query_dim
        return self.dim

    def search(self, queries: np.ndarray, k: int, query_block: int = 4096):
        """-> (D [Q, k] float32 descending, I [Q, k] int64); k is cut to the corpus size."""
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries are {queries.shape[1]}-dim, the corpus {self.dim}-dim")
        k = min(k, self.ntotal)
        D = np.empty((len(queries), k), dtype=np.float32)
        I = np.empty((len(queries), k), dtype=np.int64)
        for s in range(0, len(queries), query_block):
            q = np.ascontiguousarray(queries[s : s + query_block], dtype=np.float32)
            qt = torch.from_numpy(q).to(self.device, self.dtype)  # [q, D]
            vals, idx = self._block_topk(qt, k)
            D[s : s + len(q)], I[s : s + len(q)] = vals.float().cpu().numpy(), idx.cpu().numpy()
        return D, I

    @torch.no_grad()
    def _block_topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Running top-k of one query block over corpus blocks -> ([q, k], [q, k])."""
        step = max(k, TILE_BYTES.get(self.device.type, 256 << 20) // (4 * len(q)))
        best_v = best_i = None
        for start in range(0, self.ntotal, step):
            scores = q @ self.corpus[start : start + step].T  # [q, c]
            v, i = scores.topk(min(k, scores.shape[1]), dim=1)  # [q, k']
            i = i + start
            if best_v is not None:  # merge with what earlier blocks kept
                v, pos = torch.cat([best_v, v], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, pos)
            best_v, best_i = v, i
        return best_v, best_i
