"""Stage 4, mine: hard negatives per (query, positive) pair, filtered, each drop counted by reason.

``negatives`` mines and applies the rules (the n-gram rule included); ``ceiling`` calibrates
``mine.max_relative``; ``fncheck`` is the false-negative check and teacher rescoring, with the
pair scorers of ``scorer``.
"""
