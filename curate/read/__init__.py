"""Stage 1, read: a BEIR folder (or the generated demo set) -> validated corpus, queries, qrels.

``dataset`` reads and validates; ``synth`` generates the demo set.
"""
