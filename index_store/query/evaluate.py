"""Read queries and qrels, score runs with ``ir_measures``: nDCG@10, MRR@10, R@100, R@1000. No Beam.

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

from densebeam.index_store.query.hits import Hit

METRICS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000")


def measures(relevance_level: int = 1) -> dict:
    """Our metric names -> ``ir_measures`` measures (binary ones at ``rel=relevance_level``)."""
    import ir_measures

    if relevance_level < 1:
        raise ValueError(f"relevance level must be >= 1, got {relevance_level}")
    rel = f"(rel={relevance_level})" if relevance_level != 1 else ""
    return {"ndcg@10": ir_measures.parse_measure("nDCG@10"),
            "mrr@10": ir_measures.parse_measure(f"RR{rel}@10"),
            "recall@100": ir_measures.parse_measure(f"R{rel}@100"),
            "recall@1000": ir_measures.parse_measure(f"R{rel}@1000")}


def read_queries(path: str) -> dict[str, str]:
    """``{qid: text}`` in file order from BEIR JSONL or ``qid<TAB>text`` TSV (chosen by the first line)."""
    out: dict[str, str] = {}
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        jsonl = None
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if jsonl is None:
                jsonl = line.lstrip().startswith("{")
            try:
                if jsonl:
                    rec = json.loads(line)
                    qid, text = str(rec.get("_id", rec.get("id"))), rec["text"]
                    if qid == "None":
                        raise KeyError("_id")
                else:
                    qid, text = line.split("\t", 1)
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path} line {n}: not a BEIR query ({{\"_id\", \"text\"}}) or a "
                                 f"qid<TAB>text line ({err!r})") from err
            if qid in out:
                raise ValueError(f"{path} line {n}: query id {qid!r} appears twice")
            out[qid] = text
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
             queries: Optional[Iterable[str]] = None, relevance_level: int = 1) -> EvalReport:
    """Score ``run`` against ``qrels`` over ``queries`` (default: the run's queries) with ir_measures."""
    import ir_measures

    named = measures(relevance_level)
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
    lines.append(f"{'metric':<14}{'value':>8}")
    for name in METRICS:
        lines.append(f"{name:<14}{report.metrics[name]:>8.4f}")
    lines.append(f"{'queries':<14}{report.queries:>8}")
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
