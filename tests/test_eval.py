"""Evaluation: readers, ir_measures metrics against hand-computed values, and the eval CLI end to end."""

from __future__ import annotations

import json
import math

import pytest

from densebeam.index_store.query import evaluate as ev
from densebeam.index_store.query.hits import Hit
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import cli
from conftest import make_passages, write_jsonl
from query_fixtures import build_tiny_bundle, build_tiny_cross_encoder

# 5 docs, 2 judged queries (+ q3 unjudged, + q4 judged but never retrieved in the second case)
QRELS = {"q1": {"d1": 2, "d3": 1, "d5": 0}, "q2": {"d4": 1, "d2": 2}}
RUN = {"q1": {"d3": 0.9, "d2": 0.8, "d1": 0.7, "d5": 0.6, "d4": 0.5},
       "q2": {"d3": 0.9, "d5": 0.8, "d2": 0.7}}


def _dcg(gains):
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def test_metrics_equal_hand_computed_values():
    # q1 ranks d3(1) d2(-) d1(2) d5(0) d4(-); q2 ranks d3(-) d5(-) d2(2), d4(1) not retrieved
    ndcg_q1 = _dcg([1, 0, 2, 0, 0]) / _dcg([2, 1])
    ndcg_q2 = _dcg([0, 0, 2]) / _dcg([2, 1])
    r1 = ev.evaluate(QRELS, RUN, ["q1", "q2"])
    assert r1.queries == 2
    assert r1.metrics["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2, abs=1e-4)
    assert r1.metrics["mrr@10"] == pytest.approx((1 / 1 + 1 / 3) / 2, abs=1e-4)
    assert r1.metrics["recall@100"] == pytest.approx((2 / 2 + 1 / 2) / 2, abs=1e-4)
    assert r1.metrics["recall@1000"] == pytest.approx(0.75, abs=1e-4)
    assert r1.per_query["q1"]["ndcg@10"] == pytest.approx(ndcg_q1, abs=1e-4)
    # TREC DL style: grade >= 2 relevant for RR and R, nDCG still graded
    r2 = ev.evaluate(QRELS, RUN, ["q1", "q2"], relevance_level=2)
    assert r2.metrics["ndcg@10"] == pytest.approx(r1.metrics["ndcg@10"], abs=1e-6)
    assert r2.metrics["mrr@10"] == pytest.approx((1 / 3 + 1 / 3) / 2, abs=1e-4)
    assert r2.metrics["recall@100"] == pytest.approx(1.0, abs=1e-4)


def test_unjudged_unasked_and_empty_queries_are_reported_not_dropped():
    qrels = {**QRELS, "q4": {"d4": 1}, "q9": {"d1": 1}}
    report = ev.evaluate(qrels, RUN, ["q1", "q2", "q3", "q4"])
    assert report.queries == 3 and report.unjudged == ["q3"] and report.not_asked == ["q9"]
    assert report.no_hits == ["q4"] and report.per_query["q4"]["ndcg@10"] == 0.0
    full = ev.evaluate(QRELS, RUN, ["q1", "q2"])
    assert report.metrics["mrr@10"] == pytest.approx(full.metrics["mrr@10"] * 2 / 3, abs=1e-6)
    text = ev.format_report(report)
    assert "no judgments" in text and "q3" in text and "missing from the queries file" in text
    assert "got no hits" in text


def test_readers_accept_beir_msmarco_and_trec_formats(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"_id": "1", "text": "a b"}, {"_id": "2", "text": "c"}])
    (tmp_path / "q.tsv").write_text("1\ta b\n2\tc\n", encoding="utf-8")
    assert ev.read_queries(str(tmp_path / "q.jsonl")) == ev.read_queries(str(tmp_path / "q.tsv")) == \
        {"1": "a b", "2": "c"}
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t2\n1\td2\t0\n2\td3\t1\n")
    (tmp_path / "trec.txt").write_text("1 0 d1 2\n1 0 d2 0\n2 0 d3 1\n")
    want = {"1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}
    assert ev.read_qrels(str(tmp_path / "beir.tsv")) == ev.read_qrels(str(tmp_path / "trec.txt")) == want
    (tmp_path / "bad.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\n")
    with pytest.raises(ValueError, match="line 2"):
        ev.read_qrels(str(tmp_path / "bad.tsv"))
    (tmp_path / "dup.tsv").write_text("1\ta\n1\tb\n")
    with pytest.raises(ValueError, match="twice"):
        ev.read_queries(str(tmp_path / "dup.tsv"))


def test_run_from_hits_keeps_best_score_per_doc():
    hits = [[Hit("a", 1.0, "", "", 0), Hit("b", 0.5, "", "", 1), Hit("a", 0.2, "", "", 2)]]
    assert ev.run_from_hits(["q"], hits) == {"q": {"a": 1.0, "b": 0.5}}


@pytest.fixture(scope="module")
def collection(tmp_path_factory, tiny_cos_model):
    """A tiny bundle plus queries made of each judged doc's own words (BM25 and dense can find them)."""
    tmp = tmp_path_factory.mktemp("eval")
    bundle = build_tiny_bundle(tmp, tiny_cos_model, 150, 9)
    docs = make_passages(150, seed=9)
    queries = [{"_id": f"q{i}", "text": " ".join(docs[i * 7]["text"].split()[:6])} for i in range(20)]
    write_jsonl(tmp / "queries.jsonl", queries + [{"_id": "q-unjudged", "text": "river"}])
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\t{docs[i * 7]['_id']}\t2" for i in range(20)]
    lines += [f"q{i}\t{docs[i * 7 + 1]['_id']}\t1" for i in range(20)]
    (tmp / "qrels.tsv").write_text("\n".join(lines) + "\n")
    ce = build_tiny_cross_encoder(tmp / "ce")
    return bundle, str(tmp / "queries.jsonl"), str(tmp / "qrels.tsv"), ce, tmp


@pytest.mark.parametrize("stage", [["--first-stage", "dense"], ["--first-stage", "exact"],
                                   ["--first-stage", "bm25"],
                                   ["--first-stage", "bm25", "--bi-encoder-rerank-depth", "50"],
                                   ["--first-stage", "dense", "--rerank", "--rerank-depth", "20"]])
def test_eval_cli_json_equals_library_evaluation(collection, capsys, stage):
    bundle, qpath, qrpath, ce, tmp = collection
    rerank = "--rerank" in stage
    stage = [a for a in stage if a != "--rerank"] + (["--rerank-model", ce] if rerank else [])
    run_out = tmp / "run.trec"
    rc = cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--precision", "fp32",
                   "--k", "100", "--json", "--run-out", str(run_out), *stage])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert set(ev.METRICS) <= set(got) and got["queries"] == 20 and got["unjudged_queries"] == 1
    # the same retrieval through the library, scored by ir_measures from the written TREC run file
    import ir_measures

    qrels = ev.read_qrels(qrpath)
    run = {}
    for sd in ir_measures.read_trec_run(str(run_out)):
        run.setdefault(sd.query_id, {})[sd.doc_id] = sd.score
    assert len(run["q0"]) == 20 if rerank else 0 < len(run["q0"]) <= 100  # IVF: what the probed lists hold
    report = ev.evaluate(qrels, run, list(ev.read_queries(qpath)))
    for name in ev.METRICS:
        assert got[name] == pytest.approx(report.metrics[name], abs=1e-6)
    if stage[1] == "exact":
        searcher = Searcher.open(bundle, precision="fp32")
        qs = ev.read_queries(qpath)
        lib = searcher.search_exact(list(qs.values()), 100)
        assert ev.evaluate(qrels, ev.run_from_hits(list(qs), lib), list(qs)).metrics["ndcg@10"] == \
            pytest.approx(got["ndcg@10"], abs=1e-6)
    if stage[1] == "bm25" and len(stage) == 2:
        assert got["mrr@10"] > 0.5, "queries copy their doc's words: BM25 must find them"


def test_eval_cli_table_and_relevance_level(collection, capsys):
    bundle, qpath, qrpath, _, _ = collection
    rc = cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--first-stage", "bm25",
                   "--relevance-level", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("ndcg@10", "mrr@10", "recall@100", "recall@1000", "grade >= 2", "q-unjudged"):
        assert word in out


def test_eval_takes_ir_measures_names_and_prints_each_query(collection, capsys):
    bundle, qpath, qrpath, _, _ = collection
    rc = cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--first-stage", "bm25",
                   "--metrics", "nDCG@10,RR@10,R@100,AP,P@5", "--per-query", "--relevance-level", "2", "--json"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    assert {"nDCG@10", "RR@10", "R@100", "AP", "P@5"} <= set(got) and got["queries"] == 20
    assert set(got["per_query"]) == {f"q{i}" for i in range(20)}
    # the per-query values average to the reported means; rel=2 applies to the binary measures
    for name in ("nDCG@10", "AP", "P@5"):
        assert got[name] == pytest.approx(sum(v[name] for v in got["per_query"].values()) / 20, abs=1e-6)
    qrels, queries = ev.read_qrels(qrpath), ev.read_queries(qpath)
    searcher = Searcher.open(bundle, precision="fp32")
    hits = searcher.retrieve(list(queries.values()), 1000, first_stage="bm25")
    lib = ev.evaluate(qrels, ev.run_from_hits(list(queries), hits), list(queries), 2, ["P@5", "AP"])
    assert got["P@5"] == pytest.approx(lib.metrics["P@5"], abs=1e-6) and got["AP"] == pytest.approx(lib.metrics["AP"])
    rc = cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--first-stage", "bm25",
                   "--metrics", "AP", "--per-query"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0 and "AP\tq0\t" in "\n".join(lines) and any(line.startswith("AP\tall\t") for line in lines)


def test_eval_refuses_qrels_that_match_nothing_and_unknown_metrics(collection, tmp_path, capsys):
    bundle, qpath, qrpath, _, _ = collection
    other = tmp_path / "other.tsv"
    other.write_text("query-id\tcorpus-id\tscore\nq0\tnot-a-doc\t1\nq1\talso-not\t2\n")
    assert cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", str(other)]) != 0
    assert "none of the 2 documents judged" in capsys.readouterr().err
    unmatched = tmp_path / "q.tsv"
    unmatched.write_text("query-id\tcorpus-id\tscore\nzz1\td00001\t1\n")
    assert cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", str(unmatched)]) != 0
    assert "query ids do not match" in capsys.readouterr().err
    assert cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--metrics", "nDGC@10"]) != 0
    assert "unknown metric 'nDGC@10'" in capsys.readouterr().err
    # the two files swapped: the qrels read as queries are named as such
    assert cli.main(["eval", "--index", bundle, "--queries", qrpath, "--qrels", qpath]) != 0
    assert "a qrels header, not a query (it looks like relevance judgments: is it the qrels file? give it to " \
        "--qrels" in capsys.readouterr().err
    trec, headless = tmp_path / "qrels.trec", tmp_path / "qrels-no-header.tsv"
    trec.write_text("q0 0 d00001 1\nq1 0 d00002 2\n")
    headless.write_text("q0\td00001\t1\nq0\td00002\t2\n")
    for wrong in (trec, headless):  # a TREC line is no qid<TAB>text; a qid repeats
        assert cli.main(["eval", "--index", bundle, "--queries", str(wrong), "--qrels", qrpath]) != 0
        assert "is it the qrels file?" in capsys.readouterr().err, wrong
    # a relevance level no judgment reaches (the collection's grades are 1 and 2): every binary metric 0
    assert cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--relevance-level", "3"]) != 0
    assert "no judgment in" in (err := capsys.readouterr().err) and "(its grades: 1, 2)" in err \
        and "use --relevance-level 2" in err and "mrr@10, recall@100, recall@1000 would be 0" in err
    # ... unless no metric asked for takes it (nDCG is graded; R(rel=2) names its own level)
    assert cli.main(["eval", "--index", bundle, "--queries", qpath, "--qrels", qrpath, "--relevance-level", "3",
                     "--metrics", "nDCG@10,R(rel=2)@100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nDCG@10"] > 0
