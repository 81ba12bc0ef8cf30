"""EncodePassages: passages -> (passage, embedding) with Beam's RunInference and a sentence-transformers
ModelHandler. The model is loaded once per worker process (RunInference shares it); batches are large
and re-batched inside by token length so no compute goes to padding."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from typing import Any, Iterable, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from densebeam.index_store.encoding.encoder import DEFAULT_TOKEN_BUDGET, Encoder, load_encoder
from densebeam.index_store.types import Passage, Rejected
from densebeam.transforms.read import NAMESPACE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    model: str
    similarity: str = "auto"
    device: str = "auto"
    precision: str = "auto"
    max_seq_length: Optional[int] = None
    token_budget: int = DEFAULT_TOKEN_BUDGET
    join_title: bool = True
    batch_size: int = 512  # passages handed to one run_inference call (re-batched by tokens inside)
    progress_every_s: float = 30.0
    expected_passages: Optional[int] = None  # the launcher's estimate of the records in the corpus
    workers: int = 1  # worker processes sharing the work (for the run-wide progress estimate)
    document_prompt: Optional[str] = None  # None: the model's own (index_store.encoding.encoder.role_prompts)
    query_prompt: Optional[str] = None


class _Progress:
    """Periodic progress lines per worker process: passages encoded, passages/s, and, when the launcher
    estimated the corpus size, the run's approximate share done and an ETA (work is spread evenly over
    ``workers``, so this worker's count times ``workers`` approximates the run's)."""

    def __init__(self, every_s: float, expected: Optional[int] = None, workers: int = 1):
        self.every_s, self.expected, self.workers = every_s, expected, max(1, workers)
        self.start = self.last = time.monotonic()
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        text = f"encoded {self.count} passages in this worker, {rate:.1f} passages/s"
        if self.expected:
            done = min(self.count * self.workers, self.expected)
            left = (self.expected - done) / max(rate * self.workers, 1e-9)
            text += (f"; run ~{100 * done / self.expected:.0f}% of ~{self.expected} passages "
                     f"({self.workers} worker(s)), ETA {_duration(left)}")
        return text


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


WORKER_LOG_ENV = "DENSEBEAM_WORKER_LOG_DIR"


def _log_worker_batch(worker: str, n: int) -> None:
    """Diagnostics for load balance across workers: with ``DENSEBEAM_WORKER_LOG_DIR`` set (a local dir
    on each worker), every encoding worker appends the size of each batch it encodes to its own file
    ``encode-<host>-<pid>-<worker>.log`` there (``worker`` tells apart Beam workers that are threads of
    one process: each has its own copy of the encode step)."""
    out = os.environ.get(WORKER_LOG_ENV)
    if out:
        with open(os.path.join(out, f"encode-{socket.gethostname()}-{os.getpid()}-{worker}.log"), "a") as f:
            f.write(f"{n}\n")


@dataclasses.dataclass(frozen=True)
class EncodeFailure:
    """Stands in for the vector of a passage whose encoding raised even when it was encoded alone."""

    error: str


def encode_or_split(encode, texts: Sequence[str]) -> list:
    """``encode(texts)`` -> one vector per text; a batch that raises is split in halves and retried, so
    one bad passage does not take its batch down: a text that fails alone gets an :class:`EncodeFailure`.

    Costs nothing when nothing fails; a single bad passage costs about ``2 * log2(len(texts))`` extra
    encode calls. When everything fails (a broken model, memory exhausted at any size) every text is
    tried alone before the run's dead-letter threshold stops it.
    """
    try:
        return list(encode(list(texts)))
    except Exception as err:  # noqa: BLE001 - split and retry, then a dead letter naming the passage
        if len(texts) == 1:
            return [EncodeFailure(f"{type(err).__name__}: {err}"[:1000])]
        log.warning("encoding a batch of %d passages failed (%s: %s); retrying it in halves", len(texts),
                    type(err).__name__, str(err)[:200])
        mid = len(texts) // 2
        return encode_or_split(encode, texts[:mid]) + encode_or_split(encode, texts[mid:])


class SentenceTransformerModelHandler(ModelHandler[Passage, PredictionResult, Encoder]):
    """Holds only names and settings; ``load_model`` builds the :class:`Encoder` on the worker."""

    def __init__(self, opts: EncodeOptions):
        # Fixed-size batches: BatchElements would otherwise start at 1 and grow, and small batches
        # defeat the token-length grouping inside run_inference.
        super().__init__(min_batch_size=opts.batch_size, max_batch_size=opts.batch_size)
        self._opts = opts
        self._progress: Optional[_Progress] = None
        self._worker: Optional[str] = None  # set on the worker: this copy of the step's own name
        self._encode_msec = Metrics.counter(NAMESPACE, "encode_msec")

    def load_model(self) -> Encoder:
        o = self._opts
        return load_encoder(o.model, similarity=o.similarity, device=o.device, precision=o.precision,
                            max_seq_length=o.max_seq_length, token_budget=o.token_budget,
                            document_prompt=o.document_prompt, query_prompt=o.query_prompt)

    def run_inference(self, batch: Sequence[Passage], model: Encoder,
                      inference_args: Optional[dict[str, Any]] = None) -> Iterable[PredictionResult]:
        texts = [p.joined_text(self._opts.join_title) for p in batch]
        start = time.perf_counter()
        vectors = encode_or_split(model.encode, texts)
        self._encode_msec.inc(int(1000 * (time.perf_counter() - start)))
        if self._progress is None:
            self._progress = _Progress(self._opts.progress_every_s, self._opts.expected_passages,
                                       self._opts.workers)
        self._progress.add(len(batch))
        if self._worker is None:
            self._worker = uuid.uuid4().hex[:8]
        _log_worker_batch(self._worker, len(batch))
        tag = f"{model.precision}"  # the precision really used on this worker travels with each result
        return [PredictionResult(p, vectors[i], tag) for i, p in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[Passage]) -> int:
        return sum(len(p.text) + len(p.title) for p in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class _CheckVectorFn(beam.DoFn):
    """PredictionResult -> (passage, float32 vector, precision); NaN/Inf or all-zero vectors of cosine
    models are rejected with a reason before they reach an index."""

    def __init__(self, similarity_is_cos: bool, dim: Optional[int] = None):
        self._cos, self._dim = similarity_is_cos, dim
        self._encoded = Metrics.counter(NAMESPACE, "passages_encoded")
        self._rejected = Metrics.counter(NAMESPACE, "passages_rejected")

    def process(self, result: PredictionResult):
        p = result.example
        if isinstance(result.inference, EncodeFailure):
            self._rejected.inc()
            Metrics.counter(NAMESPACE, "rejected_encode_failed").inc()
            yield beam.pvalue.TaggedOutput("rejected", Rejected(
                reason="encode_failed", detail=f"encoding this passage alone raised {result.inference.error}",
                source_file=p.source_file, source_pos=p.source_pos, line=None, id=p.id, raw=p.text[:512]))
            return
        vec = np.asarray(result.inference, dtype=np.float32)
        reason = None
        if self._dim is not None and vec.shape != (self._dim,):
            reason = ("bad_embedding", f"embedding has shape {vec.shape}, expected ({self._dim},)")
        elif not np.all(np.isfinite(vec)):
            reason = ("bad_embedding", "embedding has NaN or Inf values")
        elif self._cos and not np.any(vec):
            reason = ("bad_embedding", "embedding is all zeros and cannot be normalized")
        if reason:
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput("rejected", Rejected(
                reason=reason[0], detail=reason[1], source_file=p.source_file, source_pos=p.source_pos,
                line=None, id=p.id, raw=p.text[:512]))
            return
        self._encoded.inc()
        yield p, vec, result.model_id, False


def _failed_batch_to_rejected(failed) -> Iterable[Rejected]:
    batch, err = failed
    Metrics.counter(NAMESPACE, "passages_rejected").inc(len(batch))
    for p in batch:
        yield Rejected(reason="encode_failed", detail=f"{type(err).__name__}: {err}"[:1000],
                       source_file=p.source_file, source_pos=p.source_pos, line=None, id=p.id,
                       raw=p.text[:512])


class EncodePassages(beam.PTransform):
    """Passages -> ``encoded`` (passage, vector, precision) and ``rejected`` (Rejected)."""

    def __init__(self, opts: EncodeOptions, similarity: str, dim: Optional[int] = None):
        super().__init__()
        self._opts = dataclasses.replace(opts, similarity=similarity)
        self._dim = dim

    def expand(self, passages):
        handler = SentenceTransformerModelHandler(self._opts)
        # 1. RunInference: batches of passages, one shared model per worker process; a batch that
        #    raises becomes dead letters instead of failing the job.
        results, failures = passages | "RunInference" >> RunInference(handler).with_exception_handling()
        # 2. Check the vectors.
        checked = results | "CheckVectors" >> beam.ParDo(
            _CheckVectorFn(self._opts.similarity == "cos", self._dim)).with_outputs("rejected", main="encoded")
        failed = failures.failed_inferences | "FailedBatches" >> beam.FlatMap(_failed_batch_to_rejected)
        return {
            "encoded": checked.encoded,
            "rejected": (checked.rejected, failed) | "EncodeRejected" >> beam.Flatten(),
        }
