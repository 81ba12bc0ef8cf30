"""FAISS IVF indexes: build plan (``plan``), sampling (``sample``), k-means on CPU and GPU (``kmeans``,
``gpu``), training and adding (``build``), FAISS files and the on-disk merge (``files``), search and
recall (``search``), nprobe per k (``nprobe``). No Beam import. The pieces the pipelines and the query
side call are importable from here (``from densebeam.index_store import ivf; ivf.train_empty_index(...)``)
and load on first use, so importing the package (for ``params``, as the parsers do) loads no FAISS."""

import importlib

# Where the package-level names live, searched in this order on first use.
_EXPORTS_FROM = ("build", "files", "params", "search")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    try:  # a submodule: ivf.plan, ivf.kmeans, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    for module in _EXPORTS_FROM:
        found = importlib.import_module(f"{__name__}.{module}")
        if hasattr(found, name):
            value = getattr(found, name)
            globals()[name] = value
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
