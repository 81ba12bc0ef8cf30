"""Query an index bundle: encode queries, search (IVF, exact or BM25), re-rank, return hits. No Beam.

    searcher = Searcher.open("gs://bucket/index", rerank_model="cross-encoder/ms-marco-MiniLM-L6-v2")
    results = searcher.retrieve(["how big is london"], k=10, rerank=True, rerank_depth=100)
    results[0][0].doc_id, results[0][0].score, results[0][0].text

Every method is batched over many queries and returns ``list[list[Hit]]`` (one list per query, best
first). The query encoder is the bundle's own model (``model_facts``) loaded with
:func:`index_store.encoding.encoder.load_encoder` (same device and precision logic as encoding, ``cos`` vectors
unit-norm); an override must agree on dimension and similarity. A :class:`Searcher` may be shared by
threads: encoding and cross-encoding are serialized (torch uses every core), FAISS search is not.

A query's answer does not depend on the other queries of a call (bit for bit): each query is encoded
alone, with no padding, and each query's hits are cross-encoded in their own ``predict`` call, so the
search service, which batches whoever is asking at the moment, answers exactly what a library call
with that one query answers. (A transformer forward pass over a padded batch gives a text a vector that
depends on its batch mates: other padding lengths and matrix shapes round differently, visibly in bf16.
FAISS IVF search is already per query.) Exact search is the exception: it scores all queries of a call
in one matrix product.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

import numpy as np

from densebeam.index_store.artifacts.bundle import Bundle, open_bundle
from densebeam.index_store.encoding.encoder import Encoder, load_encoder, pick_device, query_precision  # noqa: F401
from densebeam.index_store.query.hits import FIRST_STAGES, RRF_K, Hit, fuse_rrf, hits_from_rows, sort_hits  # noqa: F401
from densebeam.index_store.ivf.search import exact_search
from densebeam.index_store.query.stages import stage
from densebeam.index_store.query.vectors import DEFAULT_BATCH_ROWS, IvfVectors

log = logging.getLogger(__name__)



def load_query_encoder(bundle: Bundle, model: Optional[str] = None, *, device: str = "auto",
                       precision: str = "auto") -> Encoder:
    """The bundle's bi-encoder, or ``model`` if it agrees with the bundle on dimension and similarity.

    ``precision="auto"`` is decided by rule here, not by the encoder's timing measurement (which two
    processes, a service and a library call, can settle differently, giving one query two answers):
    fp32 on CPU, the :func:`encoder.pick_precision` choice (fp16) on CUDA. Queries are encoded one at a
    time (:meth:`Searcher.encode_queries`), and one short text encodes faster in fp32 than in bf16 (bf16
    pays off on large batches), besides being exact.
    """
    device = pick_device(device)
    precision = query_precision(precision, device)
    facts = bundle.facts
    # the prompts the bundle was built with ("" for a bundle older than prompts: none was used)
    prompts = {"document_prompt": facts.document_prompt or "", "query_prompt": facts.query_prompt or ""}
    if model is None or model == facts.model:
        return load_encoder(facts.model, similarity=facts.similarity, device=device, precision=precision,
                            max_seq_length=facts.max_seq_length, **prompts)
    enc = load_encoder(model, device=device, precision=precision, max_seq_length=facts.max_seq_length, **prompts)
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

    def __init__(self, bundle: Bundle, encoder, reranker=None, bm25_options: Optional[dict] = None,
                 encoder_options: Optional[dict] = None):
        self.bundle, self.reranker = bundle, reranker
        # how the encoder was loaded (model override, device, precision): with_bundle loads the same way
        self.encoder_options = dict(encoder_options or {})
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
             lazy_encoder: bool = False, trust_key: Optional[bytes] = None) -> "Searcher":
        """Open ``index`` (local path or fsspec URL; remote bundles are cached), load its model(s).

        ``lazy_encoder=True`` defers loading the bi-encoder until a query needs it (BM25-only use never
        does); by default it is loaded here, so a bad model fails at open, not at the first query.
        ``trust_key``: open only a bundle signed with it, unchanged (:mod:`index_store.artifacts.signing`).
        """
        bundle = open_bundle(index, verify=verify, cache_dir=cache_dir, trust_key=trust_key)

        def encoder():
            return load_query_encoder(bundle, model, device=device, precision=precision)

        if not lazy_encoder:
            encoder = encoder()
        reranker = None
        if rerank_model:
            from densebeam.index_store.query.rerank import CrossEncoderReranker

            reranker = CrossEncoderReranker(rerank_model, batch_size=rerank_batch_size, device=device,
                                            precision=precision)
        return cls(bundle, encoder, reranker, bm25_options,
                   encoder_options={"model": model, "device": device, "precision": precision})

    def with_bundle(self, bundle: Bundle) -> "Searcher":
        """A searcher over another (already opened) bundle that shares this one's models where it can.

        The query encoder is reused when the new bundle's model facts name the same model, revision,
        dimension, similarity and ``max_seq_length``; otherwise the new bundle's own model is loaded (with
        this searcher's model override, device and precision). The cross-encoder does not depend on the
        bundle and is always shared. Used by the service to reload without reloading models.
        """
        old, new = self.bundle.facts, bundle.facts
        same = (old.model, old.revision, old.dim, old.similarity, old.max_seq_length, old.document_prompt,
                old.query_prompt) == \
               (new.model, new.revision, new.dim, new.similarity, new.max_seq_length, new.document_prompt,
                new.query_prompt)
        if same and self._encoder is not None:
            encoder = self._encoder
        else:
            opts = self.encoder_options

            def encoder():
                return load_query_encoder(bundle, opts.get("model"), device=opts.get("device", "auto"),
                                          precision=opts.get("precision", "auto"))

            if self._load_encoder is None:  # this one loads eagerly: so does the new one
                encoder = encoder()
        return Searcher(bundle, encoder, self.reranker, self.bm25_options, self.encoder_options)

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
    def vectors(self):
        """The bundle's vectors for exact search and bi-encoder re-scoring: a tiered bundle's float32
        files (exact), else decoded from the index's lists (:class:`IvfVectors`)."""
        if self.bundle.raw_vectors is not None:
            return self.bundle.raw_vectors
        with self._lazy_lock:
            if self._vectors is None:
                self._vectors = IvfVectors(self.bundle.searcher.indexes)
            return self._vectors

    # ------------------------------------------------------------------ first stages

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """float32 (q, dim) query vectors, unit-norm for ``cos`` bundles.

        Each distinct query is encoded alone (a batch of one, no padding), so its vector is a function of
        its text only, bit for bit, whatever else the call holds. The price is the batching a padded
        forward pass would give many queries at once: see docs/query.md (service section) for what it
        costs per query and under load; a lone query costs what it always did.
        """
        _check_queries(queries)
        out = np.empty((len(queries), self.bundle.facts.dim), dtype=np.float32)
        first: dict[str, int] = {}
        with self._encode_lock, stage("encode"):
            encoder = self.encoder
            for i, query in enumerate(queries):
                if query in first:  # the same text twice in one call: one forward pass
                    out[i] = out[first[query]]
                    continue
                first[query] = i
                out[i] = encoder.encode([query], role="query")[0]
        return out

    def search_vectors(self, vectors: np.ndarray, k: int = 10, nprobe: Optional[int] = None) -> list[list[Hit]]:
        """IVF search of already-encoded queries. ``nprobe`` defaults to the one the bundle measured for
        ``k`` (:func:`index_store.ivf.nprobe.nprobe_for_k`), and then every query gets ``min(k, vectors in
        the index)`` hits (short rows are searched again with more lists: ``ivf_search.search_filled``);
        an explicit ``nprobe`` is used as given."""
        from densebeam.index_store.ivf.search import search_filled
        from densebeam.index_store.ivf.nprobe import nprobe_for_k

        if nprobe is not None:
            nprobe = int(nprobe)
            if nprobe < 1:
                raise ValueError(f"nprobe must be positive, got {nprobe}")
        with stage("search"):
            if nprobe is None:
                scores, rows = search_filled(self.bundle.searcher, vectors, k, nprobe_for_k(self.bundle.record, k))
            else:
                scores, rows = self.bundle.searcher.search(vectors, k, nprobe)
        with stage("docstore"):
            return hits_from_rows(self.bundle.docstore, scores, rows)

    def search(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None) -> list[list[Hit]]:
        """Dense IVF search: top-k hits per query, best first."""
        return self.search_vectors(self.encode_queries(queries), k, nprobe)

    def search_exact(self, queries: Sequence[str], k: int = 10,
                     batch_rows: int = DEFAULT_BATCH_ROWS) -> list[list[Hit]]:
        """Brute-force inner product over every stored vector (the ground truth IVF approximates).

        The vectors (a tiered bundle's float32 files, else decoded from the bundle's own inverted lists,
        :class:`index_store.vectors.IvfVectors`) are streamed ``batch_rows`` at a time: memory is one batch plus (q, batch_rows) scores, never
        the corpus; time is a full pass over the index per call, so pass all queries in one call.
        """
        vectors = self.encode_queries(queries)
        with stage("search"):
            scores, rows = exact_search(self.vectors.iter_batches(batch_rows), vectors, k)
        with stage("docstore"):
            return hits_from_rows(self.bundle.docstore, scores, rows)

    def search_bm25(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        _check_queries(queries)
        with stage("bm25"):
            return self.bm25.search(list(queries), k)

    def search_hybrid(self, queries: Sequence[str], k: int = 10, nprobe: Optional[int] = None,
                      rrf_k: int = RRF_K, query_vectors: Optional[np.ndarray] = None) -> list[list[Hit]]:
        """BM25 and dense IVF, each to depth ``k``, fused by reciprocal rank fusion
        (:func:`index_store.query.hits.fuse_rrf`): a document's score is the sum of 1 / (``rrf_k`` +
        its rank) over the two lists."""
        if query_vectors is None:
            query_vectors = self.encode_queries(queries)
        dense = self.search_vectors(query_vectors, k, nprobe)
        sparse = self.search_bm25(queries, k)
        return [fuse_rrf([d, b], k, rrf_k) for d, b in zip(dense, sparse)]

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
        """Cross-encoder re-rank of the top ``depth`` hits (needs ``rerank_model`` at open).

        One ``predict`` call per query (its ``depth`` pairs, length-sorted and batched as usual), so a
        query's scores never depend on the other queries of the call; with depth 100 and batch size 64 the
        batches are as full as one call over all queries would make them, but for one partial batch per
        query.
        """
        self._require_reranker()
        if len(queries) != len(results):
            raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
        with stage("rerank"):
            return [self.reranker.rerank([query], [hits], depth)[0] for query, hits in zip(queries, results)]

    def _require_reranker(self) -> None:
        if self.reranker is None:
            raise ValueError("no cross-encoder is loaded; open the searcher with rerank_model=NAME_OR_PATH "
                             "(CLI: --rerank-model)")

    # ------------------------------------------------------------------ the whole pipeline

    def retrieve(self, queries: Sequence[str], k: int = 10, *, first_stage: str = "dense",
                 nprobe: Optional[int] = None, bi_encoder_depth: Optional[int] = None, rerank: bool = False,
                 rerank_depth: int = 100, query_vectors: Optional[np.ndarray] = None,
                 rrf_k: int = RRF_K) -> list[list[Hit]]:
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
        elif first_stage == "hybrid":
            if query_vectors is None:
                query_vectors = self.encode_queries(queries)
            results = self.search_hybrid(queries, fetch, nprobe, rrf_k, query_vectors)
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
