"""Stage 7, eval: base and trained model on the held-out split.

``evaluate`` embeds and searches; ``metrics`` scores a ranked run (nDCG, Recall, MRR).
"""
