"""Contrastive and distillation losses for the trainer, with the batch masks they need.

Batch layout: B rows (query i, its positive, its mined negatives). Document columns are
C = [the B positives in row order] + [every row's negatives, flattened in row order], so column i
(i < B) is row i's own positive and the target of row i. Embeddings are L2-normalised, so
s_ij = q_i . d_j is a cosine and the logits are l_ij = s_ij / t. M is a bool [B, C] mask, True =
column j left out of row i's softmax (l_ij -> -inf); the own positive (j = i) is never masked.

InfoNCE (van den Oord et al. 2018, arXiv:1807.03748):
    L = mean_i [ -l_ii + log sum_{j : not M_ij} exp(l_ij) ]
Decoupled, DCL (Yeh et al. 2022, arXiv:2110.06848): the positive leaves the denominator,
    L = mean_i [ -l_ii + log sum_{j != i, not M_ij} exp(l_ij) ]
Multi-positive, SupCon L_out (Khosla et al. 2020, arXiv:2004.11362), P_i = positive columns of row i
(own column included), which stay in the denominator, so M must not contain them:
    L = mean_i [ -1/|P_i| sum_{p in P_i} log softmax_M(l_i)[p] ]
Symmetric (CLIP, Radford et al. 2021): the mean of the query->doc loss above and a doc->query loss
over the B x B block of positive columns, doc j (< B) choosing among the B queries with target j and
mask M[:, :B]^T, so a query for which doc j is a known positive is left out.
Bound (van den Oord 2018): I(q; d) >= log N - L, N = mean unmasked columns per row.

Masks: ``build_mask`` masks (a) another column holding a known positive (or forbidden doc) of row i
-- a false negative -- and (b) any repeat of an earlier column's doc, so each doc counts once per
row. For multi-positive use ``multi_positive_masks``: known positives become targets, not masks.

Distillation (padding via ``valid``; every row needs one valid entry):
    distill_kl  = 1/B sum_i KL( softmax(teacher_i / T) || softmax(student_i) )
    distill_mse = mean over valid entries of (student_ij - teacher_ij)^2
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _columns_by_doc(col_doc_ids: Sequence[str]) -> dict[str, list[int]]:
    cols: dict[str, list[int]] = defaultdict(list)
    for j, doc in enumerate(col_doc_ids):
        cols[doc].append(j)
    return cols


def _check_layout(col_doc_ids: Sequence[str], known_pos_ids: Sequence, n_rows: int) -> None:
    if not 0 < n_rows <= len(col_doc_ids):
        raise ValueError(f"n_rows={n_rows} must be in [1, {len(col_doc_ids)}] (number of columns)")
    if len(known_pos_ids) != n_rows:
        raise ValueError(f"known_pos_ids has {len(known_pos_ids)} rows, expected n_rows={n_rows}")


def build_mask(
    col_doc_ids: Sequence[str],
    known_pos_ids: Sequence[Iterable[str]],
    n_rows: int,
    forbidden_ids: Sequence[Iterable[str]] | None = None,
) -> Tensor:
    """Bool [B, C], True = column j leaves row i's denominator. Rules in the module docstring."""
    _check_layout(col_doc_ids, known_pos_ids, n_rows)
    if forbidden_ids is not None and len(forbidden_ids) != n_rows:
        raise ValueError(f"forbidden_ids has {len(forbidden_ids)} rows, expected {n_rows}")
    cols = _columns_by_doc(col_doc_ids)
    mask = torch.zeros(n_rows, len(col_doc_ids), dtype=torch.bool)
    repeats = [j for js in cols.values() for j in js[1:]]
    mask[:, repeats] = True
    for i in range(n_rows):
        excluded = set(known_pos_ids[i]) | set(forbidden_ids[i] if forbidden_ids else ())
        mask[i, [j for doc in excluded for j in cols.get(doc, ())]] = True
    rows = torch.arange(n_rows)
    mask[rows, rows] = False
    return mask


def positive_mask(
    col_doc_ids: Sequence[str], known_pos_ids: Sequence[Iterable[str]], n_rows: int
) -> Tensor:
    """Bool [B, C], True where column j is a known positive of row i, one column per doc.

    Row i's own column i always counts; any other copy of its own positive does not, and for
    other known positives the first column holding the doc is the one that counts.
    """
    _check_layout(col_doc_ids, known_pos_ids, n_rows)
    cols = _columns_by_doc(col_doc_ids)
    pos = torch.zeros(n_rows, len(col_doc_ids), dtype=torch.bool)
    for i in range(n_rows):
        own = col_doc_ids[i]
        pos[i, [cols[doc][0] for doc in set(known_pos_ids[i]) if doc in cols and doc != own]] = True
        pos[i, i] = True
    return pos


def multi_positive_masks(
    col_doc_ids: Sequence[str],
    known_pos_ids: Sequence[Iterable[str]],
    n_rows: int,
    forbidden_ids: Sequence[Iterable[str]] | None = None,
) -> tuple[Tensor, Tensor]:
    """(mask, positives) for ``info_nce(..., positives=...)``: positives are taken off the mask."""
    positives = positive_mask(col_doc_ids, known_pos_ids, n_rows)
    mask = build_mask(col_doc_ids, known_pos_ids, n_rows, forbidden_ids) & ~positives
    return mask, positives


def _row_losses(logits: Tensor, positives: Tensor | None, decoupled: bool) -> Tensor:
    """Per-row loss [R] for logits [R, K] (masked entries already -inf), target of row r is r."""
    r = torch.arange(logits.shape[0], device=logits.device)
    if positives is not None:
        logp = logits.log_softmax(dim=1)  # [R, K]; -inf at masked entries
        # where() before the product: -inf * 0 would be NaN in the forward and the backward.
        picked = torch.where(positives, logp, torch.zeros_like(logp))
        return -picked.sum(dim=1) / positives.sum(dim=1)
    if not decoupled:
        return F.cross_entropy(logits, r, reduction="none")
    own = logits[r, r]  # [R]
    diag = torch.eye(*logits.shape, dtype=torch.bool, device=logits.device)  # [R, K]
    lse = logits.masked_fill(diag, -math.inf).logsumexp(dim=1)  # [R]
    if torch.isinf(lse).any():
        raise ValueError("decoupled InfoNCE needs an unmasked negative in every row")
    return lse - own


def info_nce(
    q: Tensor,
    d: Tensor,
    mask: Tensor | None = None,
    temperature: float | Tensor = 0.05,
    *,
    symmetric: bool = False,
    decoupled: bool = False,
    positives: Tensor | None = None,
) -> Tensor:
    """Masked InfoNCE, q [B, D] and d [C, D] L2-normalised, C >= B; variants in module docstring."""
    n_rows = q.shape[0]
    if d.shape[0] < n_rows:
        raise ValueError(f"need at least B={n_rows} document columns, got {d.shape[0]}")
    if decoupled and positives is not None:
        raise ValueError("decoupled and positives (multi-positive) cannot be combined")
    logits = q @ d.T / temperature  # [B, C]
    if mask is not None:
        if mask.shape != logits.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logits {tuple(logits.shape)}")
        mask = mask.to(logits.device)  # build_mask returns CPU tensors
        if positives is not None and (mask & positives.to(mask.device)).any():
            raise ValueError("mask contains positive columns; use multi_positive_masks")
        logits = logits.masked_fill(mask, -math.inf)
    if positives is not None:
        if positives.shape != logits.shape:
            raise ValueError(f"positives shape {tuple(positives.shape)} != {tuple(logits.shape)}")
        positives = positives.to(logits.device)
    loss = _row_losses(logits, positives, decoupled).mean()
    if not symmetric:
        return loss
    pos_t = None if positives is None else positives[:, :n_rows].T  # [B docs, B queries]
    loss_t = _row_losses(logits[:, :n_rows].T, pos_t, decoupled).mean()  # logits^T: [B, B]
    return (loss + loss_t) / 2


class LearnableTemperature(nn.Module):
    """Temperature t = exp(log_t), clamped to [min_t, max_t] (default [0.01, 1.0]).

    The forward clamp alone would stop the gradient once log_t drifts past a bound; call
    ``clamp_()`` after each optimizer step (as OpenCLIP does with logit_scale) so log_t stays
    inside, where the gradient still flows. Keep log_t out of weight decay, which pulls t to 1.
    """

    def __init__(self, init: float = 0.05, min_t: float = 0.01, max_t: float = 1.0) -> None:
        super().__init__()
        if not 0 < min_t <= init <= max_t:
            raise ValueError(f"need 0 < min_t <= init <= max_t, got {min_t}, {init}, {max_t}")
        self.log_min, self.log_max = math.log(min_t), math.log(max_t)
        self.log_t = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> Tensor:
        return self.log_t.clamp(self.log_min, self.log_max).exp()  # 0-dim

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_t.clamp_(self.log_min, self.log_max)


def mean_candidates(mask: Tensor | None, n_cols: int) -> float:
    """Mean number of unmasked columns per row: the N of the InfoNCE bound."""
    return float(n_cols) if mask is None else (~mask).sum(dim=1).float().mean().item()


def mi_lower_bound(loss: Tensor | float, n_candidates: float) -> float:
    """InfoNCE bound on mutual information, log N - L, in nats."""
    return math.log(n_candidates) - float(loss)


def masked_fraction(mask: Tensor) -> float:
    """Share of [B, C] entries masked."""
    return mask.float().mean().item()


def _masked_log_softmax(x: Tensor, valid: Tensor | None) -> Tensor:
    return (x if valid is None else x.masked_fill(~valid, -math.inf)).log_softmax(dim=1)


def distill_kl(
    student_logits: Tensor,
    teacher_scores: Tensor,
    teacher_temperature: float = 1.0,
    valid: Tensor | None = None,
) -> Tensor:
    """KL(teacher || student) over [B, 1+n] candidate lists, batchmean; ``valid`` marks
    non-padding."""
    log_p = _masked_log_softmax(teacher_scores / teacher_temperature, valid)  # [B, 1+n]
    log_q = _masked_log_softmax(student_logits, valid)  # [B, 1+n]
    if valid is not None:
        # Zero padded entries before subtracting: -inf - -inf is NaN.
        zero = torch.zeros_like(log_q)
        log_p, log_q = torch.where(valid, log_p, zero), torch.where(valid, log_q, zero)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # [B]
    return kl.sum() / student_logits.shape[0]


def distill_mse(
    student_scores: Tensor, teacher_scores: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Mean squared error between raw scores [B, 1+n] over valid (non-padding) entries."""
    sq = (student_scores - teacher_scores) ** 2  # [B, 1+n]
    if valid is None:
        return sq.mean()
    return torch.where(valid, sq, torch.zeros_like(sq)).sum() / valid.sum().clamp(min=1)
