"""``curate report``: one self-contained HTML page from a run folder.

``page`` loads the run and writes the page; ``sections`` and ``quality`` render its sections.
"""
