"""The Beam index build: sharded build equals one in-process FAISS index, merged equals kept shards,
measured nprobe meets its recall target, model facts are checked, bundles verify, ids round-trip."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store import ivf
from densebeam.index_store.types import ModelFacts
from densebeam.pipelines import build_index
from densebeam.pipelines import cli
from conftest import make_passages, write_jsonl
from ivf_helpers import add_to_empty

LOCAL = ["--runner", "local"]
DIM = 32


def clustered(n, seed=0, clusters=40, dim=DIM):
    """Unit vectors around 40 fixed centres (the same centres for every seed: one distribution)."""
    centers = np.random.default_rng(0).normal(size=(clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed + 1000)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings_dir(root, vecs, facts: ModelFacts, shard_rows: int, prefix="v"):
    """An embeddings dir as densebeam encode writes it (Parquet shards + manifest), from given vectors."""
    root.mkdir(parents=True)
    shards = []
    bounds = list(range(0, len(vecs), shard_rows)) + [len(vecs)]
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        ids = [f"{prefix}{j}" for j in range(s, e)]
        table = emb.to_table(facts, ids, vecs[s:e], [f"text of {j}" for j in range(s, e)], [""] * (e - s))
        name = emb.SHARD_PATTERN.format(index=i, count=len(bounds) - 1)
        pq.write_table(table, root / name)
        shards.append({"path": name, "rows": e - s})
    manifest = {"format": emb.FORMAT, "format_version": 1, "model_facts": facts.to_dict(), "shards": shards,
                "counts": {"read": len(vecs), "encoded": len(vecs), "rejected": 0}, "rejected_files": []}
    (root / emb.MANIFEST).write_text(json.dumps(manifest))
    return str(root)


FACTS = ModelFacts(model="synthetic", revision=None, dim=DIM, similarity="cos", dtype="float32")
N = 6000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    vecs = clustered(N)
    emb_dir = write_embeddings_dir(tmp / "emb", vecs, FACTS, shard_rows=1700)  # 4 uneven shards
    out = {}
    for layout in ("shards", "merged"):
        out[layout] = build_index.run(["--embeddings", emb_dir, "--output", str(tmp / layout),
                                       "--layout", layout, "--nlist", "64", "--recall-queries", "300",
                                       *LOCAL])
    return tmp, vecs, out


def test_sharded_build_equals_single_faiss_index_with_same_quantizer(built):
    tmp, vecs, manifests = built
    m = manifests["shards"]
    assert m["counts"] == {"vectors": N, "shards": 4, "training_vectors": m["counts"]["training_vectors"]}
    assert m["factory"] == "IVF64,Flat" and m["metric"] == "inner_product"
    timings = m["timings"]  # worker-seconds per stage, parts = shards (or groups) that ran it
    assert set(timings) == {"sample", "kmeans", "add", "exact_topk", "write_shard", "recall_curves"}
    assert [timings[s]["parts"] for s in ("sample", "kmeans", "add")] == [4, 1, 4]
    assert all(0 <= t["max_part"] <= t["seconds"] for t in timings.values())
    assert "merge" in manifests["merged"]["timings"]
    trained = (tmp / "shards" / "trained.faiss").read_bytes()
    single = add_to_empty(trained, np.arange(N, dtype=np.int64), vecs)  # ids = global row numbers
    queries = clustered(50, seed=9)
    b = bundle_lib.open_bundle(str(tmp / "shards"))
    for nprobe in (1, 4, 16):
        want_s, want_i = ivf.ShardedSearcher([single]).search(queries, 10, nprobe)
        got_s, got_i = b.searcher.search(queries, 10, nprobe)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, atol=1e-5)


def test_merged_equals_kept_shards(built):
    tmp, _, manifests = built
    assert manifests["merged"]["layout"] == "merged"
    assert {f["path"] for f in manifests["merged"]["files"]} >= {"index.faiss", "index.ivfdata"}
    assert not any(f["path"].startswith("shards/") for f in manifests["merged"]["files"])
    # Moving the bundle must not break the memory-mapped on-disk lists.
    moved = tmp / "moved-merged"
    shutil.copytree(tmp / "merged", moved)
    merged, shards = bundle_lib.open_bundle(str(moved)), bundle_lib.open_bundle(str(tmp / "shards"))
    queries = clustered(40, seed=5)
    for nprobe in (2, 8, 64):
        a, b = merged.searcher.search(queries, 10, nprobe), shards.searcher.search(queries, 10, nprobe)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    assert manifests["merged"]["nprobe"] == manifests["shards"]["nprobe"]


def test_chosen_nprobe_meets_recall_target_against_brute_force(built):
    tmp, vecs, manifests = built
    m = manifests["merged"]
    curve = m["recall_curve"]
    assert [c["nprobe"] for c in curve][:3] == [1, 2, 4] and curve[-1]["nprobe"] <= 64
    assert m["recall_at_k"] >= 0.95 and m["nprobe"] < 64
    smaller = [c for c in curve if c["nprobe"] < m["nprobe"]]
    assert all(c["recall"] < 0.95 for c in smaller)  # the smallest that reaches the target
    # Independent check on fresh queries from the same distribution.
    queries = clustered(300, seed=77)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    _, got = bundle_lib.open_bundle(str(tmp / "merged")).searcher.search(queries, 10, m["nprobe"])
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
    assert recall >= 0.93, recall


def held_out_recall_curve(bundle_dir, emb_dir, vecs, n_queries, nprobes, codec=None, k=10):
    """The recall@k curve measured the slow way: search the bundle with the build's held-out vectors (own
    row excluded) at every nprobe, against brute force over all vectors."""
    from densebeam.index_store.ivf.plan import plan_build

    plan = plan_build([emb.open_embeddings(emb_dir)], nlist=64, n_queries=n_queries, codec=codec)
    qids = np.concatenate([s.base + plan.sample_rows(s)[1] for s in plan.shards])
    sims = vecs[qids] @ vecs.T
    sims[np.arange(len(qids)), qids] = -np.inf
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    searcher = bundle_lib.open_bundle(bundle_dir).searcher
    curve = []
    for nprobe in nprobes:
        _, got = searcher.search(vecs[qids], k + 1, nprobe)
        got = [[i for i in row if i != q][:k] for row, q in zip(got, qids)]
        curve.append(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, exact)]))
    return curve


def test_trained_on_exactly_the_planned_sample(built):
    """k-means ran on the seeded training rows of the plan, in global row order (seeded k-means:
    the same sample gives the same bytes), and none of them is a held-out query row."""
    from densebeam.index_store.ivf.plan import plan_build

    tmp, vecs, _ = built
    plan = plan_build([emb.open_embeddings(str(tmp / "emb"))], nlist=64, n_queries=300)
    rows = [(s.base + plan.sample_rows(s)[0], s.base + plan.sample_rows(s)[1]) for s in plan.shards]
    train = np.concatenate([r[0] for r in rows])
    assert len(train) == plan.train_size and not set(train) & set(np.concatenate([r[1] for r in rows]))
    want = ivf.train_empty_index(vecs[train], plan.factory, seed=plan.seed)
    assert (tmp / "merged" / "trained.faiss").read_bytes() == want


def test_recall_curves_per_k_equal_searching_the_bundle(built):
    """The manifest's curves for k = 10, 100 and 1000 (IVF-Flat: computed from list membership, no
    search) are what searching the built bundle with the same held-out vectors measures; the legacy
    single-k fields are the k = 10 ones."""
    tmp, vecs, manifests = built
    m = manifests["merged"]
    assert m["recall_ks"] == [10, 100, 1000] and m["k"] == 10
    assert m["calibration"] == {"source": "held-out vectors", "queries": 300}
    for k in (10, 100, 1000):
        curve = m["recall_curves"][str(k)]
        want = held_out_recall_curve(str(tmp / "merged"), str(tmp / "emb"), vecs, 300,
                                     [c["nprobe"] for c in curve], k=k)
        assert [c["recall"] for c in curve] == pytest.approx(want, abs=1e-4), k
        chosen = m["nprobe_by_k"][str(k)]
        assert chosen == next(c for c in curve if c["recall"] >= 0.95)  # the smallest reaching the target
    assert m["recall_curve"] == m["recall_curves"]["10"]
    assert (m["nprobe"], m["recall_at_k"]) == (m["nprobe_by_k"]["10"]["nprobe"], m["nprobe_by_k"]["10"]["recall"])
    by_k = [m["nprobe_by_k"][str(k)]["nprobe"] for k in (10, 100, 1000)]
    assert by_k == sorted(by_k) and by_k[0] < by_k[2]  # more hits need more lists
    assert manifests["shards"]["recall_curves"] == m["recall_curves"]


def test_sq8_build_measures_its_curves_by_search(tmp_path):
    vecs = clustered(3000, seed=3)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=1000)
    m = build_index.run(["--embeddings", emb_dir, "--output", str(tmp_path / "i"), "--codec", "SQ8",
                         "--refine", "off", "--nlist", "64", "--recall-queries", "200", "--target-recall", "0.9",
                         "--k", "10,100",
                         *LOCAL])
    assert m["factory"] == "IVF64,SQ8" and m["codec"] == "SQ8"
    for k in (10, 100):
        curve = m["recall_curves"][str(k)]
        want = held_out_recall_curve(str(tmp_path / "i"), emb_dir, vecs, 200, [c["nprobe"] for c in curve],
                                     codec="SQ8", k=k)
        assert [c["recall"] for c in curve] == pytest.approx(want, abs=1e-4), k
        assert curve[-1]["nprobe"] == 64 and 0.9 < curve[-1]["recall"] < 1.0  # SQ8 is lossy even exhaustively
    assert m["recall_at_k"] >= 0.9 and m["recall_curve"] == m["recall_curves"]["10"]
    assert "refine" not in m and not (tmp_path / "i" / "vectors").exists()  # --refine off: compact scores only


@pytest.mark.parametrize("nlist,codec,want", [
    (64, "Flat", [1, 2, 4, 8, 16, 32, 64]),  # curve from list membership: the whole series
    (4096, "Flat", [2 ** i for i in range(13)]),
    (64, "SQ8", [1, 2, 4, 8, 16, 64]),  # searched: up to max(16, nlist/8), then exhaustive
    (4096, "PQ8x8", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 4096]),
    (65536, "Flat", [2 ** i for i in range(14)] + [65536]),  # HNSW-assigned lists: searched, capped
    (65536, "PQ48x8", [2 ** i for i in range(14)]),  # compact codes over many lists: no exhaustive scan
])
def test_nprobe_candidates(nlist, codec, want):
    from densebeam.index_store.ivf.plan import BuildPlan

    plan = BuildPlan(facts=FACTS, shards=(), n_vectors=10**7, nlist=nlist, codec=codec,
                     factory=ivf.factory_string(nlist, codec), train_size=0, n_queries=0, ks=(10,),
                     target_recall=0.95, layout="merged", seed=0)
    assert plan.nprobe_candidates() == want


def test_ids_round_trip_to_documents(built):
    tmp, vecs, _ = built
    b = bundle_lib.open_bundle(str(tmp / "merged"))
    _, ids = b.searcher.search(vecs[[0, 1699, 1700, 5999]], 1, 64)
    docs = b.docstore.get(ids[:, 0].tolist())
    assert [d["id"] for d in docs] == ["v0", "v1699", "v1700", "v5999"]
    assert docs[2]["text"] == "text of 1700"


def test_mismatched_model_facts_are_refused(tmp_path):
    a = write_embeddings_dir(tmp_path / "a", clustered(500), FACTS, 500)
    other = ModelFacts(model="other-model", revision=None, dim=DIM, similarity="dot", dtype="float32")
    b = write_embeddings_dir(tmp_path / "b", clustered(500, seed=1), other, 500, prefix="w")
    with pytest.raises(ValueError) as err:
        build_index.run(["--embeddings", a, "--embeddings", b, "--output", str(tmp_path / "i"), *LOCAL])
    msg = str(err.value)
    assert "synthetic" in msg and "other-model" in msg and "similarity" in msg and str(tmp_path / "b") in msg
    assert not (tmp_path / "i" / "manifest.json").exists()


def test_two_embeddings_dirs_get_unique_ids(tmp_path):
    a = write_embeddings_dir(tmp_path / "a", clustered(800), FACTS, 300)
    b = write_embeddings_dir(tmp_path / "b", clustered(700, seed=1), FACTS, 400, prefix="w")
    m = build_index.run(["--embeddings", a, "--embeddings", b, "--output", str(tmp_path / "i"),
                         "--layout", "shards", *LOCAL])
    assert m["counts"]["vectors"] == 1500 and m["counts"]["shards"] == 5
    assert [s["base"] for s in m["shards"]] == [0, 300, 600, 800, 1200]
    store = bundle_lib.open_bundle(str(tmp_path / "i")).docstore
    got = store.get(list(range(1500)))
    assert [d["id"] for d in got] == [f"v{i}" for i in range(800)] + [f"w{i}" for i in range(700)]


def test_altered_or_missing_file_refused_naming_it(built, tmp_path):
    tmp, _, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(tmp / "merged", copy)
    part = next((copy / "docstore").iterdir())
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(bundle_lib.BundleError, match=part.name):
        bundle_lib.open_bundle(str(copy))
    (copy / "index.ivfdata").unlink()
    with pytest.raises(bundle_lib.BundleError, match="index.ivfdata"):
        bundle_lib.open_bundle(str(copy), verify="sizes")


def test_overwrite_guard_and_failed_rebuild_leaves_no_bundle(built, tmp_path):
    tmp, vecs, _ = built
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs[:2000], FACTS, 1000)
    args = ["--embeddings", emb_dir, "--output", str(tmp_path / "o"), "--nlist", "16", *LOCAL]
    build_index.run(args)
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index.run(args)
    with pytest.raises(ValueError, match="nlist"):  # refused while planning: the old bundle stays
        build_index.run(args[:-4] + ["--nlist", "100000", "--overwrite", *LOCAL])
    assert bundle_lib.open_bundle(str(tmp_path / "o")).searcher.ntotal == 2000
    shard = tmp_path / "emb" / "part-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # corrupt: the rebuild fails inside the pipeline
    with pytest.raises(Exception):
        build_index.run(args + ["--overwrite"])
    with pytest.raises(bundle_lib.BundleError):
        bundle_lib.open_bundle(str(tmp_path / "o"))


def test_densebeam_build_end_to_end_with_tiny_model(tmp_path, tiny_cos_model, capsys):
    recs = make_passages(400, seed=21) + [{"_id": "bad", "text": ""}]
    src = write_jsonl(tmp_path / "corpus.jsonl", recs)
    qfile = write_jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{i}", "text": p["text"]}
                                                     for i, p in enumerate(make_passages(60, seed=5))])
    rc = cli.main(["build", "--input", str(src), "--output", str(tmp_path / "idx"), "--model", tiny_cos_model,
                   "--precision", "fp32", "--rows-per-shard", "150", "--calibration-queries", str(qfile),
                   "--k", "10,50", *LOCAL])
    out = capsys.readouterr().out
    assert rc == 0 and "read 401  vectors 400 (400 encoded now, 0 reused from earlier runs)  rejected 1" in out and "default nprobe" in out
    b = bundle_lib.open_bundle(str(tmp_path / "idx"))
    assert b.searcher.ntotal == 400 and b.manifest["counts"]["shards"] == 3
    assert b.facts.model == tiny_cos_model and b.facts.similarity == "cos"
    # A passage's own embedding finds itself first, and the docstore returns its text.
    e = emb.open_embeddings(str(tmp_path / "idx.embeddings"))
    ids, vecs = next(e.iter_batches(batch_rows=5))
    _, rows = b.searcher.search(vecs, 1, b.searcher.nlist)
    assert [d["id"] for d in b.docstore.get(rows[:, 0].tolist())] == ids
    text = {r["_id"]: r["text"] for r in recs}
    assert all(d["text"] == text[d["id"]] for d in b.docstore.get(list(range(0, 400, 37))))
    rc = cli.main(["inspect", str(tmp_path / "idx"), "--verify"])
    assert rc == 0 and "verified" in capsys.readouterr().out
    # The calibration queries were encoded with the bundle's model as the query side encodes them: the
    # curves are what searching with the query side's vectors measures.
    from densebeam.index_store.query.search import Searcher

    assert b.manifest["calibration"]["queries"] == 60 and b.manifest["calibration"]["path"] == str(qfile)
    qvecs = Searcher.open(str(tmp_path / "idx")).encode_queries([p["text"] for p in make_passages(60, seed=5)])
    _, vecs_all = zip(*e.iter_batches(batch_rows=1000))
    for k in (10, 50):
        _, exact = ivf.exact_search([(np.arange(400), np.concatenate(vecs_all))], qvecs, k)
        curve = b.manifest["recall_curves"][str(k)]
        got = [ivf.recall_at_k(b.searcher.search(qvecs, k, c["nprobe"])[1], exact, k) for c in curve]
        assert [c["recall"] for c in curve] == pytest.approx(got, abs=1e-3), k


def test_manifest_records_absolute_input_paths(tmp_path, monkeypatch):
    write_embeddings_dir(tmp_path / "emb", clustered(600), FACTS, shard_rows=300)
    monkeypatch.chdir(tmp_path)
    m = build_index.run(["--embeddings", "emb", "--output", "idx", "--nlist", "4", "--recall-queries", "20",
                         "--runner", "local"])
    assert m["inputs"] == [{"embeddings": str(tmp_path / "emb"), "counts": m["inputs"][0]["counts"]}]


def cluster_labels(n, seed=0, clusters=40):
    """The latent cluster of each vector :func:`clustered` draws (same generator, same order)."""
    return np.random.default_rng(seed + 1000).integers(0, clusters, n)


def test_dense_recall_at_100_and_1000_agree_with_exact_search(built):
    """Relevance = same latent cluster (150 relevant documents a query). Through ``Searcher`` with the
    default nprobe, dense R@100 and R@1000 agree with exact search within 0.01 and every query gets its
    1000 hits; the single nprobe measured at k = 10 (the old default for every k) does not."""
    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.search import Searcher

    tmp, vecs, _ = built
    labels = cluster_labels(N)
    queries, qlabels = clustered(200, seed=55), cluster_labels(200, seed=55)
    qids = [f"q{i}" for i in range(len(queries))]
    qrels = {q: {f"v{j}": 1 for j in np.flatnonzero(labels == lab)} for q, lab in zip(qids, qlabels)}

    def never_encode():
        raise AssertionError("search_vectors must not load the encoder")

    searcher = Searcher(bundle_lib.open_bundle(str(tmp / "merged")), never_encode)
    _, exact_ids = ivf.exact_search([(np.arange(N), vecs)], queries, 1000)
    exact = {q: {f"v{j}": -float(r) for r, j in enumerate(row)} for q, row in zip(qids, exact_ids)}
    want = ev.evaluate(qrels, exact, qids).metrics
    results = searcher.search_vectors(queries, k=1000)
    assert all(len(hits) == 1000 for hits in results)
    got = ev.evaluate(qrels, ev.run_from_hits(qids, results), qids).metrics
    for metric in ("recall@100", "recall@1000"):
        assert abs(got[metric] - want[metric]) <= 0.01, (metric, got[metric], want[metric])
    old = searcher.search_vectors(queries, k=1000, nprobe=searcher.bundle.manifest["nprobe"])
    assert max(len(hits) for hits in old) < 1000
    old_r = ev.evaluate(qrels, ev.run_from_hits(qids, old), qids).metrics["recall@1000"]
    assert old_r < want["recall@1000"] - 0.01, (old_r, want["recall@1000"])  # the criterion, failed


def test_calibration_queries_measure_the_curves(built, tmp_path):
    """``--calibration-queries q.npy``: the curves are recall of those queries (no row excluded) against
    brute force, the manifest names the file, and the index itself is the same as without them."""
    tmp, vecs, manifests = built
    queries = clustered(400, seed=31)
    path = tmp_path / "q.npy"
    np.save(path, queries)
    m = build_index.run(["--embeddings", str(tmp / "emb"), "--output", str(tmp_path / "i"), "--nlist", "64",
                         "--recall-queries", "300", "--k", "10,100", "--calibration-queries", str(path),
                         *LOCAL])
    cal = m["calibration"]
    assert cal["source"] == "queries file" and cal["path"] == str(path) and cal["queries"] == 300
    assert cal["in_file"] == 400 and len(cal["sha256"]) == 64 and m["recall_ks"] == [10, 100]
    assert "300 queries from" in m["recall_measured_on"]
    assert (tmp_path / "i" / "trained.faiss").read_bytes() == (tmp / "merged" / "trained.faiss").read_bytes()
    keep = np.sort(np.random.default_rng([1234, 7]).choice(400, 300, replace=False))
    searcher = bundle_lib.open_bundle(str(tmp_path / "i")).searcher
    for k in (10, 100):
        _, exact = ivf.exact_search([(np.arange(N), vecs)], queries[keep], k)
        curve = m["recall_curves"][str(k)]
        searched = [ivf.recall_at_k(searcher.search(queries[keep], k, c["nprobe"])[1], exact, k) for c in curve]
        assert [c["recall"] for c in curve] == pytest.approx(searched, abs=1e-4), k
    bad = tmp_path / "bad.npy"
    np.save(bad, queries[:, :8])
    with pytest.raises(Exception, match="calibration"):
        build_index.run(["--embeddings", str(tmp / "emb"), "--output", str(tmp_path / "j"), "--nlist", "64",
                         "--calibration-queries", str(bad), *LOCAL])


def test_two_level_kmeans_over_workers_equals_in_process(built, tmp_path):
    """``--kmeans two-level``: the coarse step writes groups of coarse clusters to files, fine k-means runs
    per group on any worker, the refine step streams the sample again; the trained index is byte for byte
    the in-process ``train_empty_index`` on the plan's sample, with one worker or two, and from the same
    rows split into other shards (the sample files hold other shares, concatenated in global row order)."""
    from densebeam.index_store.ivf.plan import plan_build

    tmp, vecs, _ = built
    args = ["--nlist", "64", "--recall-queries", "300", "--kmeans", "two-level"]
    plan = plan_build([emb.open_embeddings(str(tmp / "emb"))], nlist=64, n_queries=300, kmeans="two-level")
    train = np.concatenate([s.base + plan.sample_rows(s)[0] for s in plan.shards])
    want = ivf.train_empty_index(vecs[train], plan.factory, seed=plan.seed, method="two-level")
    other = write_embeddings_dir(tmp_path / "emb1000", vecs, FACTS, shard_rows=1000)
    for workers, emb_dir in (("1", tmp / "emb"), ("2", tmp / "emb"), ("2-other-shards", other)):
        m = build_index.run(args + ["--embeddings", str(emb_dir), "--output", str(tmp_path / workers),
                                    "--runner", "local", "--workers", workers[0]])
        assert (tmp_path / workers / "trained.faiss").read_bytes() == want, workers
        assert m["training"]["kmeans"] == "two-level" and m["training"]["coarse"] == 8
        assert [m["timings"][s]["parts"] for s in ("kmeans_coarse", "kmeans_fine", "kmeans_refine")] == [1, 8, 1]
        assert not (tmp_path / workers / "_build").exists()  # the group files went with the temp dir
    assert m["nprobe_by_k"]["10"]["recall"] >= 0.95


def test_any_shard_layout_of_the_same_rows_gives_the_same_bundle(built, tmp_path):
    """The training and held-out query samples are drawn over global row ids, not per written shard: the
    same rows split into 6 shards or 1 (another worker count or runner writes other shard boundaries over
    the same canonical row order), built with 1 or 2 workers, give byte-identical trained and merged
    indexes, the same FAISS id per document, and the same measured curves and nprobe."""
    from densebeam.index_store.ivf.plan import plan_build

    tmp, vecs, manifests = built
    want = manifests["merged"]
    same = ("nprobe", "recall_at_k", "recall_curve", "nprobe_by_k", "recall_curves", "calibration", "training",
            "factory")
    plans = [plan_build([emb.open_embeddings(str(tmp / "emb"))], nlist=64, n_queries=300)]
    for rows, workers in ((1000, "2"), (6000, "1")):
        emb_dir = write_embeddings_dir(tmp_path / f"emb{rows}", vecs, FACTS, shard_rows=rows)
        plans.append(plan_build([emb.open_embeddings(emb_dir)], nlist=64, n_queries=300))
        out = tmp_path / f"i{rows}"
        m = build_index.run(["--embeddings", emb_dir, "--output", str(out), "--nlist", "64", "--recall-queries",
                             "300", "--runner", "local", "--workers", workers])
        assert m["counts"]["shards"] == -(-N // rows) and m["counts"]["training_vectors"] == plans[0].train_size
        assert {f: m[f] for f in same} == {f: want[f] for f in same}, rows
        for name in ("trained.faiss", "index.faiss", "index.ivfdata"):
            assert (out / name).read_bytes() == (tmp / "merged" / name).read_bytes(), (rows, name)
        store = bundle_lib.open_bundle(str(out)).docstore
        assert [d["id"] for d in store.get(list(range(N)))] == [f"v{i}" for i in range(N)]
    # The plans agree on the global rows sampled; each shard's counts are the sample's rows it holds.
    for i in (0, 1):
        rows = [np.concatenate([s.base + p.sample_rows(s)[i] for s in p.shards]) for p in plans]
        assert all(np.array_equal(r, rows[0]) for r in rows[1:]), i
    for p in plans:
        assert sum(s.n_train for s in p.shards) == p.train_size and sum(s.n_queries for s in p.shards) == 300


def test_a_budget_too_small_to_train_its_codec_fails_at_planning(tmp_path, capsys):
    """A budget that calls for PQ but bounds the training sample below PQ's 256 centroids per sub-vector is
    refused before anything is built, saying what budget would do."""
    vecs = clustered(1460, seed=5)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=800)
    rc = cli.main(["index", "--embeddings", emb_dir, "--output", str(tmp_path / "tight"), "--memory-budget", "20000",
                   *LOCAL])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("densebeam index: error: --memory-budget 20000 bytes bounds the training "
                                      "sample to 156 vectors, fewer than the 256 the PQ4x8 codec"), err
    assert "at least 32768 bytes" in err
    assert not (tmp_path / "tight" / bundle_lib.MANIFEST).exists()
    # that budget builds: tests/test_codec_choice.py


def test_a_pq_codec_on_a_corpus_too_small_to_train_it_is_refused(tmp_path):
    vecs = clustered(200, seed=6)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=200)
    with pytest.raises(ValueError, match=r"the PQ8x8 codec needs at least 256 training vectors and this corpus "
                                         r"has 180 to train on; pass --codec SQ8"):
        build_index.run(["--embeddings", emb_dir, "--output", str(tmp_path / "i"), "--codec", "PQ8x8", *LOCAL])


def test_embeddings_manifest_is_a_typed_record_checked_at_open(tmp_path):
    """The embeddings dir's manifest is read into a frozen record equal to its JSON; a damaged field is
    refused at open, naming it, before any planning reads it."""
    import dataclasses

    vecs = clustered(300, seed=7)
    root = tmp_path / "emb"
    write_embeddings_dir(root, vecs, FACTS, shard_rows=128)
    d = emb.open_embeddings(str(root))
    raw = json.loads((root / emb.MANIFEST).read_text())
    assert d.record.facts == FACTS and d.record.rows == 300
    assert [(s.path, s.rows) for s in d.record.shards] == [(s["path"], s["rows"]) for s in raw["shards"]]
    assert d.counts == raw["counts"] and d.shard_paths[0] == f"{root}/{raw['shards'][0]['path']}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.record.shards = ()
    for field, value, named in [("shards", [{"path": "part-0.parquet", "rows": -1}], "shards[0]"),
                                ("shards", [{"path": "../x.parquet", "rows": 3}], "shards[0]"),
                                ("counts", {"read": 1}, "counts"), ("model_facts", {"dim": "x"}, "model_facts"),
                                ("format_version", True, "format_version")]:
        bad = dict(raw, **{field: value})
        (root / emb.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"malformed {re.escape(named)}"):
            emb.open_embeddings(str(root))
