"""densebeam: corpus shards -> Parquet embeddings -> sharded FAISS IVF index bundles, on Apache Beam.

The repository keeps its folders at the root (``pipelines/``, ``transforms/``, ``index_store/``,
``runners/``); ``setup.py`` installs them as the one package ``densebeam`` (``densebeam.pipelines``,
``densebeam.index_store``, ...) so nothing else lands at the top level of site-packages. This file is
that package's ``__init__``: keep it free of imports (a search service imports ``densebeam.index_store``
without Apache Beam).
"""

__version__ = "0.2.0"
