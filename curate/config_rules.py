"""Settings that must agree with each other, checked when a config is loaded.

A combination that cannot work (an empty mining window, more negatives than the window holds)
is a ConfigError naming every key involved and the fix; one that runs but wastes work or
misleads (spares that cannot fit, a window cut short by the search depth) is logged as a
warning. Limits that depend on the data (rows per batch, queries per topic) are not known here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from curate.errors import ConfigError

if TYPE_CHECKING:
    from curate.config import Config

log = logging.getLogger("curate.config")

Finding = tuple[tuple[str, ...], str]  # (the keys involved, what is wrong and the fix)


def _window(cfg: Config) -> tuple[int, int]:
    """[start, end) of the retrieval ranks negatives are taken from: the search returns ranks
    below top_k only, so the window ends at min(range_max, top_k)."""
    m = cfg.mine
    return m.range_min, min(m.range_max, m.top_k)


def impossible(cfg: Config) -> list[Finding]:
    """Combinations under which no row can get what was asked for."""
    m = cfg.mine
    start, end = _window(cfg)
    if m.range_min >= m.range_max:
        return [(("mine.range_min", "mine.range_max"),
                 f"mine.range_min={m.range_min} is not below mine.range_max={m.range_max}, so the "
                 "mining window [range_min, range_max) of retrieval ranks is empty; set "
                 "mine.range_min below mine.range_max")]  # fmt: skip
    if m.range_min >= m.top_k:
        return [(("mine.range_min", "mine.top_k"),
                 f"mine.range_min={m.range_min} is not below mine.top_k={m.top_k}: the search "
                 f"returns ranks 0-{m.top_k - 1} only, so the window holds no candidate; raise "
                 f"mine.top_k above {m.range_min} or lower mine.range_min")]  # fmt: skip
    if m.num_negatives > end - start:
        depth = "mine.top_k" if m.top_k <= m.range_max else "mine.range_max"
        keys = ("mine.num_negatives", depth) + (("mine.range_min",) if start else ())
        return [(keys,
                 f"mine.num_negatives={m.num_negatives} cannot be filled: the mining window "
                 f"[{start}, {end}) (mine.range_min={m.range_min}, mine.top_k={m.top_k}, "
                 f"mine.range_max={m.range_max}) holds {end - start} candidates, before the "
                 f"false-negative filters drop any; lower mine.num_negatives to at most "
                 f"{end - start} (fewer leaves room for the filters) or raise mine.top_k and "
                 f"mine.range_max well above {start + m.num_negatives}")]  # fmt: skip
    return []


def unwise(cfg: Config) -> list[Finding]:
    """Combinations that run, but not as the settings suggest."""
    m, out = cfg.mine, []
    start, end = _window(cfg)
    if m.range_max > m.top_k:
        out.append((("mine.range_max", "mine.top_k"),
                    f"mine.range_max={m.range_max} is beyond mine.top_k={m.top_k}: ranks from "
                    f"{m.top_k} on are never searched, so the window ends at {m.top_k}; raise "
                    f"mine.top_k to {m.range_max} to mine that deep"))  # fmt: skip
    if m.num_negatives + m.spare_negatives > end - start:
        out.append((("mine.num_negatives", "mine.spare_negatives", "mine.top_k"),
                    f"mine.num_negatives={m.num_negatives} + mine.spare_negatives="
                    f"{m.spare_negatives} is more than the {end - start} candidates of the window "
                    f"[{start}, {end}): rows get fewer spares (or negatives) than asked; widen the "
                    "window (mine.top_k, mine.range_max) or ask for fewer"))  # fmt: skip
    f = cfg.fncheck
    ceiling = m.max_relative if m.calibrate_ceiling is None else None
    if f.scorer is not None and ceiling is not None and f.band[0] >= ceiling:
        out.append((("fncheck.band", "mine.max_relative"),
                    f"fncheck.band starts at {f.band[0]}, at or above mine.max_relative={ceiling}: "
                    "kept negatives score at most max_relative x the positive, so few or none "
                    "fall in the band and the check judges almost nothing; lower fncheck.band[0]"
                    ))  # fmt: skip
    t = cfg.train
    if t.enabled and t.max_steps is not None and t.warmup_steps >= t.max_steps:
        out.append((("train.warmup_steps", "train.max_steps"),
                    f"train.warmup_steps={t.warmup_steps} is not below train.max_steps="
                    f"{t.max_steps}: the learning rate never finishes warming up; lower "
                    "train.warmup_steps"))  # fmt: skip
    if cfg.eval.enabled and cfg.data.eval_split == cfg.data.train_split:
        out.append((("data.eval_split", "data.train_split"),
                    f"data.eval_split is the training split ({cfg.data.train_split!r}): the "
                    "evaluation scores queries the model was trained on; hold out another split"
                    ))  # fmt: skip
    c = cfg.cluster
    if c.workers == "in_process" and c.n_workers and c.n_workers > 1:
        out.append((("cluster.workers", "cluster.n_workers"),
                    f"cluster.workers=in_process runs one worker, so cluster.n_workers="
                    f"{c.n_workers} is ignored; set cluster.workers=processes to use "
                    "them"))  # fmt: skip
    return out


def check_data(cfg: Config, train_pairs: int) -> None:
    """What the dataset makes impossible, once read (``train_pairs``: positive pairs to mine)."""
    b, d = cfg.batch, cfg.data
    if train_pairs == 0 and d.train_positives == "min_score":
        detail = (f"data.train_min_score={d.train_min_score}: no positive of the train split "
                  f"scores that high, so there is nothing to train on; lower "
                  "data.train_min_score or set data.train_positives=all")  # fmt: skip
        raise ConfigError(detail, ("data.train_min_score", "data.train_positives"), "", detail)
    if b.drop_last and train_pairs < b.batch_size:
        detail = (f"batch.batch_size={b.batch_size} with batch.drop_last: the train split has "
                  f"{train_pairs} pairs, fewer than one batch, so every row would be dropped; "
                  "lower batch.batch_size or set batch.drop_last=false")  # fmt: skip
        raise ConfigError(detail, ("batch.batch_size", "batch.drop_last"), "", detail)


def check(cfg: Config) -> list[Finding]:
    """Raise a ConfigError for the first impossible combination; log the unwise ones.
    -> the warnings logged (keys, message)."""
    for keys, detail in impossible(cfg):
        raise ConfigError(detail, keys, "", detail)
    warnings = unwise(cfg)
    for _, detail in warnings:
        log.warning("config: %s", detail)
    return warnings
