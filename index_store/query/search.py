"""Query an index bundle: encode queries, search (IVF, exact or BM25), re-rank, return hits. No Beam.

    searcher = Searcher.open("gs://bucket/index", rerank_model="cross-encoder/ms-marco-MiniLM-L6-v2")
    results = searcher.retrieve(["how big is london"], k=10, rerank=True, rerank_depth=100)
    results[0][0].doc_id, results[0][0].score, results[0][0].text

Every method is batched over many queries and returns ``list[list[Hit]]`` (one list per query, best
first). The query encoder is the bundle's own model (``model_facts``) loaded with
:func:`index_store.encoder.load_encoder` (same device and precision logic as encoding, ``cos`` vectors
unit-norm); an override must agree on dimension and similarity. A :class:`Searcher` may be shared by
threads: encoding and cross-encoding are serialized (torch uses every core), FAISS search is not.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

import numpy as np

from densebeam.index_store.bundle import Bundle, open_bundle
from densebeam.index_store.encoder import Encoder, load_encoder
from densebeam.index_store.query.hits import Hit, hits_from_rows, sort_hits
from densebeam.index_store.ivf_search import exact_search
from densebeam.index_store.query.vectors import DEFAULT_BATCH_ROWS, IvfVectors

log = logging.getLogger(__name__)

FIRST_STAGES = ("dense", "exact", "bm25")


def load_query_encoder(bundle: Bundle, model: Optional[str] = None, *, device: str = "auto",
                       precision: str = "auto") -> Encoder:
    """The bundle's bi-encoder, or ``model`` if it agrees with the bundle on dimension and similarity."""
    facts = bundle.facts
    if model is None or model == facts.model:
        return load_encoder(facts.model, similarity=facts.similarity, device=device, precision=precision,
                            max_seq_length=facts.max_seq_length)
    enc = load_encoder(model, device=device, precision=precision, max_seq_length=facts.max_seq_length)
    if enc.dim != facts.dim or enc.similarity != facts.similarity:
        raise ValueError(f"query model {model!r} gives {enc.dim}-dim {enc.similarity} vectors but the bundle "
                         f"{bundle.root} holds {facts.dim}-dim {facts.similarity} vectors of {facts.model!r}; "
                         "query it with its own model (drop the override) or rebuild the index")
    log.warning("querying a bundle built with %s using %s: same dim and similarity, but the vectors are only "
                "comparable if the models are the same weights", facts.model, model)
    return enc


class Searcher:
    """An opened bundle plus its query encoder, and optionally a cross-encoder and a lazy BM25 index.

    ``encoder`` is an :class:`Encoder` or a zero-argument function that loads one: then the bi-encoder
    is loaded on first use, so BM25-only work (``first_stage="bm25"``) never loads it.
    """

    def __init__(self, bundle: Bundle, encoder, reranker=None, bm25_options: Optional[dict] = None):
        self.bundle, self.reranker = bundle, reranker
        self._encode_lock = threading.Lock()
        self._lazy_lock = threading.Lock()
        self._encoder: Optional[Encoder] = None
        self._load_encoder = encoder if callable(encoder) and not isinstance(encoder, Encoder) else None
        if self._load_encoder is None:
            self._set_encoder(encoder)
        self.bm25_options = dict(bm25_options or {})
        self._bm25 = None
        self._vectors: Optional[IvfVectors] = None

    @classmethod
    def open(cls, index: str, *, model: Optional[str] = None, device: str = "auto", precision: str = "auto",
             verify: str = "full", cache_dir: Optional[str] = None, rerank_model: Optional[str] = None,
             rerank_batch_size: int = 64, bm25_options: Optional[dict] = None,
             lazy_encoder: bool = False) -> "Searcher":
        """Open ``index`` (local path or fsspec URL; remote bundles are cached), load its model(s).

        ``lazy_encoder=True`` defers loading the bi-encoder until a query needs it (BM25-only use never
        does); by default it is loaded here, so a bad model fails at open, not at the first query.
        """
        bundle = open_bundle(index, verify=verify, cache_dir=cache_dir)

        def encoder():
            return load_query_encoder(bundle, model, device=device, precision=precision)

        if not lazy_encoder:
            encoder = encoder()
        reranker = None
        if rerank_model:
            from densebeam.index_store.query.rerank import CrossEncoderReranker

            reranker = CrossEncoderReranker(rerank_model, batch_size=rerank_batch_size, device=device,
                                            precision=precision)
        return cls(bundle, encoder, reranker, bm25_options)

    def _set_encoder(self, encoder: Encoder) -> None:
        if encoder.dim != self.bundle.facts.dim:
            raise ValueError(f"encoder dim {encoder.dim} != bundle dim {self.bundle.facts.dim}")
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The query bi-encoder, loaded now if it was deferred."""
        with self._lazy_lock:
            if self._encoder is None:
                self._set_encoder(self._load_encoder())
            return self._encoder

    @property
    def default_nprobe(self) -> int:
        return self.bundle.default_nprobe

    @property
    def nlist(self) -> int:
        return self.bundle.searcher.nlist

    @property
    def bm25(self):
        """The BM25 index, built from the docstore on first use (see :mod:`index_store.bm25`)."""
        with self._lazy_lock:
            if self._bm25 is None:
                from densebeam.index_store.query.bm25 import BM25Index

                self._bm25 = BM25Index(self.bundle.docstore, **self.bm25_options)
            return self._bm25

    @property
    def vectors(self) -> IvfVectors:
        with self._lazy_lock:
            if self._vectors is None:
                self._vectors = IvfVectors(self.bundle.searcher.indexes)
            return self._vectors

    # ------------------------------------------------------------------ first stages

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """float32 (q, dim) query vectors, unit-norm for ``cos`` bundles."""
        _check_queries(queries)
        with self._encode_lock:
            return self.encoder.encode(list(queries))

    def search_vectors(self, vectors: np.ndarray, k: int = 10, nprobe: Optional[int] = None) -> list[list[Hit]]:
        """IVF search of already-encoded queries (``nprobe`` defaults to the bundle's measured one)."""
        nprobe = self.default_nprobe if nprobe is None else int(nprobe)
        if nprobe < 1:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        scores, rows = self.bundle.searcher.search(vectors, k, nprobe)
        return hits_from_rows(self.bundle.docstore, scores, rows)

    def search(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None) -> list[list[Hit]]:
        """Dense IVF search: top-k hits per query, best first."""
        return self.search_vectors(self.encode_queries(queries), k, nprobe)

    def search_exact(self, queries: Sequence[str], k: int = 10,
                     batch_rows: int = DEFAULT_BATCH_ROWS) -> list[list[Hit]]:
        """Brute-force inner product over every stored vector (the ground truth IVF approximates).

        The vectors are decoded from the bundle's own inverted lists and streamed ``batch_rows`` at a time
        (:class:`index_store.vectors.IvfVectors`): memory is one batch plus (q, batch_rows) scores, never
        the corpus; time is a full pass over the index per call, so pass all queries in one call.
        """
        vectors = self.encode_queries(queries)
        scores, rows = exact_search(self.vectors.iter_batches(batch_rows), vectors, k)
        return hits_from_rows(self.bundle.docstore, scores, rows)

    def search_bm25(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        _check_queries(queries)
        return self.bm25.search(list(queries), k)

    # ------------------------------------------------------------------ re-rankers

    def bi_encoder_rerank(self, queries: Sequence[str], results: Sequence[Sequence[Hit]],
                          query_vectors: Optional[np.ndarray] = None) -> list[list[Hit]]:
        """Re-score hits (e.g. BM25's top 100) by the bi-encoder: query vector · the row's stored vector."""
        if len(queries) != len(results):
            raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
        if query_vectors is None:
            query_vectors = self.encode_queries(queries)
        out = []
        for qvec, hits in zip(query_vectors, results):
            if not hits:
                out.append([])
                continue
            scores = self.vectors.get([h.row for h in hits]) @ qvec
            out.append(sort_hits(h.rescored(s) for h, s in zip(hits, scores)))
        return out

    def rerank(self, queries: Sequence[str], results: Sequence[Sequence[Hit]], depth: int = 100) -> list[list[Hit]]:
        """Cross-encoder re-rank of the top ``depth`` hits (needs ``rerank_model`` at open)."""
        self._require_reranker()
        return self.reranker.rerank(queries, results, depth)

    def _require_reranker(self) -> None:
        if self.reranker is None:
            raise ValueError("no cross-encoder is loaded; open the searcher with rerank_model=NAME_OR_PATH "
                             "(CLI: --rerank-model)")

    # ------------------------------------------------------------------ the whole pipeline

    def retrieve(self, queries: Sequence[str], k: int = 10, *, first_stage: str = "dense",
                 nprobe: Optional[int] = None, bi_encoder_depth: Optional[int] = None, rerank: bool = False,
                 rerank_depth: int = 100, query_vectors: Optional[np.ndarray] = None) -> list[list[Hit]]:
        """First stage -> optional bi-encoder re-rank of its top ``bi_encoder_depth`` -> optional
        cross-encoder re-rank of the top ``rerank_depth`` -> top ``k``.

        A re-ranked list holds only what was re-ranked: ``min(k, depth)`` hits.
        """
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {FIRST_STAGES}, got {first_stage!r}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if rerank:
            self._require_reranker()
        fetch = rerank_depth if rerank else k
        if bi_encoder_depth:
            fetch = int(bi_encoder_depth)
        if first_stage == "bm25":
            results = self.search_bm25(queries, fetch)
        elif first_stage == "exact":
            results = self.search_exact(queries, fetch)
        else:
            if query_vectors is None:
                query_vectors = self.encode_queries(queries)
            results = self.search_vectors(query_vectors, fetch, nprobe)
        if bi_encoder_depth:
            results = self.bi_encoder_rerank(queries, results, query_vectors)
        if rerank:
            results = self.rerank(queries, results, rerank_depth)
        return [hits[:k] for hits in results]


def _check_queries(queries: Sequence[str]) -> None:
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings, not one string; wrap it: [query]")
    bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
    if bad:
        raise TypeError(f"queries must be strings; items {bad[:5]} are not")
