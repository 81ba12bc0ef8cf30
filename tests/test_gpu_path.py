"""The GPU path of index builds (``index_store.ivf.gpu``): PyTorch's flat spherical k-means and list assignment,
run here on the CPU (``DENSEBEAM_GPU=torch-cpu``: the same code as on CUDA, a CPU device), checked against
FAISS and through a real Beam build. tests/test_gpu.py runs the same on a CUDA GPU where there is one."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pytest

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store import ivf
from densebeam.index_store.ivf import gpu
from densebeam.pipelines import build_index
from test_build_index import FACTS, clustered, write_embeddings_dir

pytest.importorskip("torch")


def objective(x, centroids):
    """Sum of each vector's best inner product with the centroids (what spherical k-means maximizes)."""
    return float(faiss.knn(x, centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].sum())


def faiss_flat_kmeans(x, k, seed, niter=10):
    cp = faiss.ClusteringParameters()
    cp.spherical, cp.niter, cp.seed, cp.max_points_per_centroid = True, niter, seed, 1 << 30
    clus = faiss.Clustering(x.shape[1], k, cp)
    clus.train(x, faiss.IndexFlatIP(x.shape[1]))
    return faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1])


def pieces(x, size):
    return lambda: (x[a:a + size] for a in range(0, len(x), size))


def test_torch_kmeans_matches_faiss_quality_and_ignores_how_input_arrives():
    x = clustered(6000, seed=3)
    k = 64
    whole = gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], k, seed=7, device="cpu")
    assert whole.shape == (k, x.shape[1]) and whole.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-5)
    # another cut of the same rows, and a second run: the same bytes
    for size in (777, 5000, 1):
        if size == 1:
            again = gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], k, seed=7, device="cpu")
        else:
            again = gpu.spherical_kmeans(pieces(x, size), len(x), x.shape[1], k, seed=7, device="cpu")
        assert np.array_equal(again, whole), size
    # as good a clustering as FAISS's flat k-means (different initial draws: within 1%)
    ours, theirs = objective(x, whole), objective(x, faiss_flat_kmeans(x, k, seed=7))
    assert ours >= 0.99 * theirs, (ours, theirs)
    # k-means improved on its initial centroids, iteration by iteration
    seen = []
    gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], k, seed=7, niter=5, device="cpu",
                         progress=lambda it, obj: seen.append((it, obj)))
    assert [it for it, _ in seen] == list(range(5)) and seen[-1][1] >= seen[0][1]
    assert gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], k, seed=8, device="cpu").tobytes() != whole.tobytes()


def test_resident_and_streamed_vectors_give_the_same_centroids(monkeypatch):
    """The vectors copied to the device once (as on a GPU with room: the initial centroids then come
    from that copy) or streamed every iteration: the same bytes."""
    x = clustered(4000, seed=4)
    streamed = gpu.spherical_kmeans(pieces(x, 999), len(x), x.shape[1], 32, seed=2, niter=4, device="cpu")
    monkeypatch.setattr(gpu, "_fits", lambda device, nbytes: True)
    resident = gpu.spherical_kmeans(pieces(x, 999), len(x), x.shape[1], 32, seed=2, niter=4, device="cpu")
    assert np.array_equal(resident, streamed)
    with pytest.raises(ValueError, match="hold more than 3000 rows"):
        gpu.spherical_kmeans(pieces(x, 999), 3000, x.shape[1], 32, seed=2, device="cpu")
    with pytest.raises(ValueError, match="hold 4000 rows, expected 5000"):
        gpu.spherical_kmeans(pieces(x, 999), 5000, x.shape[1], 32, seed=2, device="cpu")


def test_torch_kmeans_splits_empty_clusters_and_checks_its_input():
    x = np.repeat(clustered(5, seed=1), 40, axis=0)  # 5 distinct vectors, 10 centroids: clusters empty out
    c = gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], 10, seed=0, niter=5, device="cpu")
    assert c.shape == (10, x.shape[1]) and np.isfinite(c).all()
    assert len(np.unique(c.round(6), axis=0)) == 10  # every centroid took a distinct place
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="cannot cluster 200 vectors into 201"):
        gpu.spherical_kmeans(lambda: (x,), len(x), x.shape[1], 201, seed=0, device="cpu")
    with pytest.raises(ValueError, match="hold 200 rows, expected 300"):
        gpu.spherical_kmeans(lambda: (x,), 300, x.shape[1], 10, seed=0, device="cpu")


def test_assigner_equals_faiss_search():
    x, c = clustered(3000, seed=5), clustered(200, seed=6)
    a = gpu.InnerProductAssigner(c, device="cpu")
    want_d, want_i = faiss.knn(x, c, 5, metric=faiss.METRIC_INNER_PRODUCT)
    d, i = a.search(x, 5)
    assert np.array_equal(i, want_i) and np.allclose(d, want_d, atol=1e-5)
    assert np.array_equal(a.assign(x, 1), want_i[:, :1])
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        a.assign(x[:, :8])
    with pytest.raises(ValueError, match="k must be in 1..200"):
        a.search(x, 201)


def test_backend_setting(monkeypatch):
    monkeypatch.setenv("DENSEBEAM_GPU", "0")
    assert gpu.backend() is None and gpu.describe() == "cpu" and ivf.kmeans_method("auto", 4096) == "two-level"
    monkeypatch.setenv("DENSEBEAM_GPU", "torch-cpu")
    assert gpu.backend() == "torch" and gpu.describe() == "cpu (torch)"
    assert ivf.kmeans_method("auto", 4096) == "flat" and ivf.kmeans_method("two-level", 4096) == "two-level"
    monkeypatch.setenv("DENSEBEAM_GPU", "cuda-please")
    with pytest.raises(ValueError, match="DENSEBEAM_GPU must be auto, 0 or torch-cpu"):
        gpu.backend()
    if not os.path.exists("/dev/nvidiactl") and not hasattr(faiss, "StandardGpuResources"):
        monkeypatch.delenv("DENSEBEAM_GPU")
        assert gpu.backend() is None  # no NVIDIA driver here: CPU, and torch is not imported to find out


def test_beam_build_on_the_torch_path(tmp_path, monkeypatch):
    """A real Beam build with the GPU path on (PyTorch on the CPU here): ``--kmeans auto`` trains flat
    k-means with PyTorch streamed from the sample files, equal to the in-process trainer on the plan's
    sample, adding assigns with PyTorch, the manifest says where each ran, 1 and 2 workers write the same
    bytes, and every vector sits in the list FAISS's own quantizer would give it."""
    from densebeam.index_store.ivf.plan import plan_build

    monkeypatch.setenv("DENSEBEAM_GPU", "torch-cpu")
    n = 6000
    vecs = clustered(n)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=1700)
    args = ["--embeddings", emb_dir, "--nlist", "64", "--recall-queries", "300", "--runner", "local"]
    built = {w: build_index.run(args + ["--output", str(tmp_path / w), "--workers", w]) for w in ("1", "2")}
    m = built["1"]
    assert m["training"]["kmeans"] == "flat"
    assert m["devices"] == {"kmeans": "cpu (torch)", "add": "cpu (torch)"}
    assert m["nprobe_by_k"]["10"]["recall"] >= 0.95
    for name in ("trained.faiss", "index.faiss", "index.ivfdata"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    plan = plan_build([emb.open_embeddings(emb_dir)], nlist=64, n_queries=300)
    rows = np.concatenate([s.base + plan.sample_rows(s)[0] for s in plan.shards])
    want = ivf.train_empty_index(vecs[rows], plan.factory, seed=plan.seed)
    assert (tmp_path / "1" / "trained.faiss").read_bytes() == want
    # lists: what the trained index's own (CPU, FAISS) quantizer assigns
    index = ivf.open_merged(str(tmp_path / "1" / "index.faiss"), str(tmp_path / "1" / "index.ivfdata"))
    quantizer = faiss.extract_index_ivf(index).quantizer
    lists = quantizer.assign(vecs, 1).ravel()
    invlists = faiss.extract_index_ivf(index).invlists
    got = np.empty(n, dtype=np.int64)
    for lst in range(invlists.nlist):
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), invlists.list_size(lst)).copy()
        got[ids] = lst
    assert np.array_equal(got, lists)
    # the CPU path gives another (two-level below 1024 lists is flat FAISS) but as good a quantizer
    monkeypatch.setenv("DENSEBEAM_GPU", "0")
    cpu = build_index.run(args + ["--output", str(tmp_path / "cpu")])
    assert cpu["devices"] == {"kmeans": "cpu", "add": "cpu"}
    assert abs(cpu["nprobe_by_k"]["10"]["recall"] - m["nprobe_by_k"]["10"]["recall"]) <= 0.03
