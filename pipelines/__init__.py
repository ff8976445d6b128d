"""Dask wiring of curate's stages: ``pipelines.run.run(config)`` runs them all."""
