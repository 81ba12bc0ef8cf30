"""The names and thresholds of an IVF build that the command line offers, without importing FAISS (the
CLI checks its flags before any heavy import). No Beam import."""

from __future__ import annotations

LAYOUTS = ("merged", "shards")  # one memory-mappable on-disk index, or one index per shard
KMEANS = ("auto", "flat", "two-level")  # coarse quantizer training (index_store.ivf.kmeans_method)
TWO_LEVEL_MIN_NLIST = 1024  # below this, flat k-means costs seconds and two levels buy nothing
REFINE = ("auto", "off")  # exact re-scoring of compact codes: auto = on for every codec but Flat
REFINE_FACTORS = (1, 2, 4, 8, 16, 32, 64)  # refine factors a build measures (1: the compact top k, re-scored)
