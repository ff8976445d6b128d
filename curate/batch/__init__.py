"""Stage 5, batch: dedup, topics, batch composition, shards and manifest.

``dedup`` maps docs to canonical ids; ``topics`` clusters queries; ``compose`` builds
collision-free batches; ``curation`` turns mined pairs into the shard table; ``shards`` writes and
reads the shards; ``export`` writes them for other trainers.
"""
