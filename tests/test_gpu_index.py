"""The index build's GPU path (``index_store.ivf.gpu``) on a CUDA GPU: PyTorch's flat k-means deterministic
whether the sample sits in GPU memory or streams, as good as FAISS's CPU k-means, list assignment equal to
FAISS's, and a real Beam build that trains and adds on the GPU. Skipped (with the reason) without CUDA;
tests/test_gpu_path.py runs the same code on the CPU everywhere.

    python -m pytest -s -o addopts="" tests/test_gpu_index.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from densebeam.index_store.ivf import gpu

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA GPU: torch.cuda.is_available() is False")]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from index_bench import clustered_batches  # noqa: E402


@pytest.fixture(scope="module")
def sample():
    return np.concatenate(list(clustered_batches(200_000, 384)))


def test_cuda_kmeans_resident_or_streamed_same_bytes_and_as_good_as_faiss(sample, monkeypatch):
    k, n, d = 1024, len(sample), sample.shape[1]
    chunks = lambda: (sample[a:a + 30_000] for a in range(0, n, 30_000))  # noqa: E731
    t = time.perf_counter()
    resident = gpu.spherical_kmeans(chunks, n, d, k, seed=5, device="cuda")
    t_gpu = time.perf_counter() - t
    assert np.array_equal(gpu.spherical_kmeans(lambda: (sample,), n, d, k, seed=5, device="cuda"), resident)
    monkeypatch.setattr(gpu, "RESIDENT_FRACTION", 0.0)  # stream from the host every iteration
    assert np.array_equal(gpu.spherical_kmeans(chunks, n, d, k, seed=5, device="cuda"), resident)
    cp = faiss.ClusteringParameters()
    cp.spherical, cp.niter, cp.seed, cp.max_points_per_centroid = True, 10, 5, 1 << 30
    clus = faiss.Clustering(d, k, cp)
    t = time.perf_counter()
    clus.train(sample, faiss.IndexFlatIP(d))
    t_cpu = time.perf_counter() - t
    theirs = faiss.vector_to_array(clus.centroids).reshape(k, d)
    obj = {name: float(faiss.knn(sample, c, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].sum())
           for name, c in (("cuda", resident), ("faiss", theirs))}
    print(f"\n{torch.cuda.get_device_name()}: k-means {n} x {d} into {k}: torch on CUDA {t_gpu:.2f} s "
          f"(first call, start-up included), FAISS on {faiss.omp_get_max_threads()} CPU threads {t_cpu:.2f} s; "
          f"objective {obj['cuda']:.1f} vs {obj['faiss']:.1f}")
    assert obj["cuda"] >= 0.995 * obj["faiss"]


def test_cuda_assignment_equals_faiss(sample):
    c = sample[np.random.default_rng(0).choice(len(sample), 4096, replace=False)]
    got = gpu.InnerProductAssigner(c, device="cuda").assign(sample, 1).ravel()
    want = faiss.knn(sample, c, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel()
    assert float(np.mean(got == want)) >= 0.9999  # float rounding may break near-ties the other way


def test_beam_build_trains_and_adds_on_the_gpu(tmp_path, monkeypatch):
    pytest.importorskip("apache_beam")
    from densebeam.pipelines import build_index
    from test_build_index import FACTS, clustered, write_embeddings_dir

    monkeypatch.delenv("DENSEBEAM_GPU", raising=False)
    vecs = clustered(20_000)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=6000)
    m = build_index.run(["--embeddings", emb_dir, "--output", str(tmp_path / "b"), "--nlist", "256",
                         "--runner", "local"])
    print(f"\nGPU build: devices {m['devices']}, timings {m['timings']}")
    assert m["training"]["kmeans"] == "flat"
    assert m["devices"]["kmeans"].startswith("cuda (torch") and m["devices"]["add"].startswith("cuda (torch")
    assert m["nprobe_by_k"]["10"]["recall"] >= 0.95
