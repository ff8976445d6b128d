"""Stage 3, index: FAISS indexes over the doc vectors, streamed top-k search, the recall guard.

``build`` builds and searches; ``exact`` is the brute-force search; ``recall`` guards approximate
indexes against a recall floor.
"""
