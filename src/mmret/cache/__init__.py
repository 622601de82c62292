"""Caches on disk, keyed by fingerprints of the model and the data: frozen tower features
(:mod:`~mmret.cache.tower_features`), layer features (:mod:`~mmret.cache.layer_features`) and
embeddings (:mod:`~mmret.cache.embeddings`). Training, evaluation and memories read them."""
