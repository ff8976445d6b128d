"""Stage 2, embed: texts -> unit vectors, cached per partition.

``encoder`` loads the model and encodes; ``plan`` decides which texts share a batch and a task.
"""
