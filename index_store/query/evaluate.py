"""Read queries and qrels, score runs with ``ir_measures`` (by default nDCG@10, MRR@10, R@100, R@1000; any
measure ir_measures names on request). No Beam.

Formats: queries as BEIR JSONL (``{"_id", "text"}``) or MS MARCO TSV (``qid<TAB>text``); qrels as BEIR
TSV (header ``query-id corpus-id score``) or TREC (``qid 0 docid rel``). ``relevance_level`` is the
grade from which a document counts as relevant for the binary measures (RR, R): TREC DL uses 2.
nDCG always uses the graded judgments. Every metric is computed by ``ir_measures`` (pytrec_eval);
the mean is over every evaluated query, and a query with no hits counts 0 (trec_eval -c), where
trec_eval itself would drop it. Queries without judgments are not evaluated but reported.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Mapping, Optional, Sequence

import fsspec

from densebeam.index_store.corpus_io import read_queries  # noqa: F401 - evaluate.read_queries
from densebeam.index_store.query.hits import Hit

METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")
_DEFAULT = {"ndcg@10": "nDCG@10", "mrr@10": "RR@10", "recall@100": "R@100", "recall@1000": "R@1000"}


def measures(relevance_level: int = 1, names: Optional[Sequence[str]] = None) -> dict:
    """Metric names -> ``ir_measures`` measures: ``names`` in ir_measures' syntax (``nDCG@10``,
    ``RR@10``, ``R@100``, ``AP``, ``P@5``, ``Judged@10``, ...), or by default ours (:data:`METRICS`). A
    binary measure that takes a relevance level and names none counts grade >= ``relevance_level``
    relevant; nDCG uses the graded judgments."""
    import ir_measures

    if relevance_level < 1:
        raise ValueError(f"relevance level must be >= 1, got {relevance_level}")
    spec = dict(_DEFAULT) if not names else {n: n for n in names}
    out = {}
    for name, text in spec.items():
        try:
            measure = ir_measures.parse_measure(text)
        except (ValueError, NameError, TypeError, SyntaxError) as err:
            raise ValueError(f"unknown metric {text!r} ({err}); use ir_measures names, e.g. nDCG@10, RR@10, "
                             "R@100, AP, P@5") from err
        if relevance_level != 1 and "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=relevance_level)
        out[name] = measure
    return out


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """``{qid: {docid: grade}}`` from BEIR TSV (header line) or TREC qrels (``qid iter docid rel``)."""
    out: dict[str, dict[str, int]] = {}
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if not parts or (n == 1 and parts[0].lower() in ("query-id", "query_id", "qid")):
                continue
            try:
                if len(parts) == 4:
                    qid, _, docid, grade = parts
                elif len(parts) == 3:
                    qid, docid, grade = parts
                else:
                    raise ValueError(f"{len(parts)} fields")
                grade = int(float(grade))
            except ValueError as err:
                raise ValueError(f"{path} line {n}: expected 'query-id corpus-id score' (BEIR) or "
                                 f"'qid 0 docid rel' (TREC): {err}") from err
            out.setdefault(qid, {})[docid] = grade
    if not out:
        raise ValueError(f"{path} holds no judgments")
    return out


def run_from_hits(qids: Sequence[str], results: Sequence[Sequence[Hit]]) -> dict[str, dict[str, float]]:
    """``{qid: {docid: score}}``; a document listed twice for a query keeps its best score."""
    run: dict[str, dict[str, float]] = {}
    for qid, hits in zip(qids, results):
        docs = run.setdefault(qid, {})
        for hit in hits:
            docs[hit.doc_id] = max(hit.score, docs.get(hit.doc_id, float("-inf")))
    return run


@dataclasses.dataclass
class EvalReport:
    metrics: dict[str, float]  # our metric name -> mean over evaluated queries
    per_query: dict[str, dict[str, float]]  # qid -> metric name -> value
    queries: int  # evaluated queries (have judgments)
    unjudged: list[str]  # queries asked but without qrels: not evaluated
    not_asked: list[str]  # qrels queries that are not in the queries file
    no_hits: list[str]  # evaluated queries the run returned nothing for (scored 0)
    relevance_level: int = 1

    def to_dict(self) -> dict:
        return {**{k: round(v, 6) for k, v in self.metrics.items()}, "queries": self.queries,
                "relevance_level": self.relevance_level, "unjudged_queries": len(self.unjudged),
                "qrels_queries_not_asked": len(self.not_asked), "queries_without_hits": len(self.no_hits)}


def evaluate(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
             queries: Optional[Iterable[str]] = None, relevance_level: int = 1,
             metrics: Optional[Sequence[str]] = None) -> EvalReport:
    """Score ``run`` against ``qrels`` over ``queries`` (default: the run's queries) with ir_measures;
    ``metrics``: ir_measures names (default: :data:`METRICS`)."""
    import ir_measures

    named = measures(relevance_level, metrics)
    asked = list(queries) if queries is not None else list(run)
    judged = [q for q in asked if q in qrels]
    judged_set = set(judged)
    qrels_list = [ir_measures.Qrel(q, d, int(g)) for q in judged for d, g in qrels[q].items()]
    run_list = [ir_measures.ScoredDoc(q, d, float(s)) for q in judged for d, s in run.get(q, {}).items()]
    by_measure = {m: name for name, m in named.items()}
    per_query = {q: {name: 0.0 for name in named} for q in judged}
    for metric in ir_measures.iter_calc(list(named.values()), qrels_list, run_list):
        if metric.query_id in judged_set:
            per_query[metric.query_id][by_measure[metric.measure]] = float(metric.value)
    means = {name: (sum(v[name] for v in per_query.values()) / len(judged) if judged else 0.0)
             for name in named}
    asked_set = set(asked)
    return EvalReport(metrics=means, per_query=per_query, queries=len(judged),
                      unjudged=[q for q in asked if q not in qrels],
                      not_asked=sorted(q for q in qrels if q not in asked_set),
                      no_hits=[q for q in judged if not run.get(q)], relevance_level=relevance_level)


def format_report(report: EvalReport, title: str = "") -> str:
    """A readable table: one metric a line, then what was not evaluated and why."""
    lines = [title] if title else []
    width = max([14] + [len(name) + 2 for name in report.metrics])
    lines.append(f"{'metric':<{width}}{'value':>8}")
    for name, value in report.metrics.items():
        lines.append(f"{name:<{width}}{value:>8.4f}")
    lines.append(f"{'queries':<{width}}{report.queries:>8}")
    if report.relevance_level != 1:
        lines.append(f"binary metrics count grade >= {report.relevance_level} as relevant (nDCG is graded)")
    if report.unjudged:
        lines.append(f"{len(report.unjudged)} queries have no judgments and were not evaluated: "
                     f"{', '.join(report.unjudged[:10])}{' ...' if len(report.unjudged) > 10 else ''}")
    if report.not_asked:
        lines.append(f"{len(report.not_asked)} judged queries are missing from the queries file: "
                     f"{', '.join(report.not_asked[:10])}{' ...' if len(report.not_asked) > 10 else ''}")
    if report.no_hits:
        lines.append(f"{len(report.no_hits)} queries got no hits (scored 0)")
    return "\n".join(lines)


def format_per_query(report: EvalReport) -> str:
    """trec_eval -q style lines: ``metric<TAB>qid<TAB>value``, queries in evaluation order, then ``all``."""
    lines = [f"{name}\t{qid}\t{values[name]:.4f}" for qid, values in report.per_query.items() for name in values]
    lines += [f"{name}\tall\t{value:.4f}" for name, value in report.metrics.items()]
    return "\n".join(lines)


def judged_documents(qrels: Mapping[str, Mapping[str, int]], queries: Iterable[str]) -> set[str]:
    """The document ids judged for ``queries`` (any grade)."""
    return {d for q in queries for d in qrels.get(q, {})}
