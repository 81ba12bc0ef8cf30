"""BM25 first stage over a bundle's docstore, with ``bm25s``. No Beam import.

The BM25 index is built in memory when first asked for, streaming the docstore one Arrow record batch
at a time (texts are tokenized batch by batch and dropped; only token ids are kept). Nothing is written
into the bundle: a bundle stays what the index pipeline published and its manifest stays the commit
point. Trade-off: building costs one pass over the corpus text at open time (about a second per
100k short passages) and memory is the token-id lists while indexing plus the sparse score matrix
after (roughly 8-12 bytes per distinct (term, doc) pair: ~0.5 GB for 1M MS MARCO passages). For much
larger corpora build the BM25 index once offline (e.g. pyserini) and feed its run to the re-rankers.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterator, Optional, Sequence

import numpy as np

from densebeam.index_store.artifacts.docstore import Docstore
from densebeam.index_store.query.hits import Hit, hits_from_rows

log = logging.getLogger(__name__)

# Anserini's defaults (k1=0.9, b=0.4), the usual BM25 baseline on MS MARCO / TREC DL.
DEFAULT_K1 = 0.9
DEFAULT_B = 0.4


def iter_docstore(docstore: Docstore) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
    """Stream (FAISS rows, texts, titles) one record batch at a time (memory: one batch)."""
    for part in docstore.parts:
        row = part.base
        for b in range(part.reader.num_record_batches):
            batch = part.reader.get_batch(b)
            n = batch.num_rows
            texts = [t or "" for t in batch.column(1).to_pylist()]
            titles = [t or "" for t in batch.column(2).to_pylist()]
            yield np.arange(row, row + n, dtype=np.int64), texts, titles
            row += n


class BM25Index:
    """BM25 (Lucene variant) over ``title + " " + text`` of every docstore row; :meth:`search` -> hits."""

    def __init__(self, docstore: Docstore, *, k1: float = DEFAULT_K1, b: float = DEFAULT_B,
                 stopwords: Optional[str] = "en", stemmer: Optional[str] = None, join_title: bool = True):
        import bm25s
        from bm25s.tokenization import Tokenized, Tokenizer

        # bm25s sets its own logger to DEBUG when first imported; undo that (its progress lines are noise).
        if logging.getLogger("bm25s").level == logging.DEBUG:
            logging.getLogger("bm25s").setLevel(logging.WARNING)

        self.docstore = docstore
        self.tokenizer = Tokenizer(stopwords=stopwords or [], stemmer=_stemmer(stemmer))
        rows, ids = [], []
        for batch_rows, texts, titles in iter_docstore(docstore):
            passages = [f"{ti} {t}" if join_title and ti else t for t, ti in zip(texts, titles)]
            ids.extend(self.tokenizer.tokenize(passages, update_vocab=True, return_as="ids",
                                               show_progress=False))
            rows.append(batch_rows)
        if not ids:
            raise ValueError("the docstore is empty: nothing to build a BM25 index over")
        self.rows = np.concatenate(rows)
        self.model = bm25s.BM25(k1=k1, b=b)
        self.model.index(Tokenized(ids=ids, vocab=self.tokenizer.get_vocab_dict()), show_progress=False)
        self.params = {"k1": k1, "b": b, "stopwords": stopwords, "stemmer": stemmer, "join_title": join_title}
        self._lock = threading.Lock()  # the tokenizer's query path is not documented as thread-safe
        log.info("BM25 index over %d passages, %d terms", len(self.rows), len(self.tokenizer.get_vocab_dict()))

    def __len__(self) -> int:
        return len(self.rows)

    def search_rows(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (q, k) float32, FAISS rows (q, k) int64); rows matching no query term are -1."""
        from bm25s.tokenization import Tokenized

        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        q = len(queries)
        scores = np.zeros((q, k), dtype=np.float32)
        rows = np.full((q, k), -1, dtype=np.int64)
        if not q:
            return scores, rows
        kk = min(k, len(self.rows))
        with self._lock:
            tokens = self.tokenizer.tokenize(list(queries), update_vocab=False, return_as="ids",
                                             show_progress=False)
            docs, sc = self.model.retrieve(Tokenized(ids=tokens, vocab=self.tokenizer.get_vocab_dict()),
                                           k=kk, show_progress=False)
        found = self.rows[np.asarray(docs, dtype=np.int64)]
        sc = np.asarray(sc, dtype=np.float32)
        scores[:, :kk], rows[:, :kk] = sc, np.where(sc > 0, found, -1)
        return scores, rows

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k BM25 hits per query, best first (documents sharing no term with the query are left out)."""
        return hits_from_rows(self.docstore, *self.search_rows(queries, k))


def _stemmer(name: Optional[str]):
    if not name:
        return None
    try:
        import Stemmer
    except ImportError as err:
        raise ValueError(f"BM25 stemmer {name!r} needs PyStemmer: pip install PyStemmer") from err
    return Stemmer.Stemmer(name).stemWord
