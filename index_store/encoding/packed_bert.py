"""Padding-free forward pass of a BERT-family sentence-transformers model. No Beam import.

Sequences are *packed*: the tokens of all passages of a batch are rows of one (tokens, hidden) matrix, so
every linear layer, layer norm and activation runs on real tokens only, as one large matrix product.
Attention is the only step that needs the sequences apart: passages are ordered by length, so the
passages of one length are consecutive rows and ``rows.view(n, length, ...)`` gives them to
``scaled_dot_product_attention`` with no mask and no padding. On CPUs with AVX-512 BF16, the bf16
modes run attention in one native call per layer instead (:mod:`index_store.encoding.native`; a native residual
add + layer norm for ``bf16`` exists too, off by default). The result equals the padded forward of
``transformers``' ``BertModel`` followed by sentence-transformers' mean or CLS pooling (padding never
changes a real token's output), to float rounding: tested against ``SentenceTransformer.encode``.

Modes: ``fp32`` everywhere; ``int16``: as fp32, but the matrix products on integers in the native int16
kernels (inputs rounded per token to 14 bits, weights per output channel to 12, exact integer sums;
:mod:`index_store.encoding.native`); ``bf16``: bf16 weights (cast once and, on CPU, pre-packed in oneDNN's
blocked layout, so no per-call weight reorder) and activations, with attention softmax and pooling in
float32; ``bf16-mixed``: bf16 matrix products but the residual stream and layer norms in float32 (more
faithful; ~10% slower on CPU with PyTorch's residual connections, as fast with the native ones); ``fp16``: as ``bf16`` in float16 (GPUs). Which one runs by default is not
decided here: :mod:`index_store.encoding.encoder` measures it on the corpus.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence

import numpy as np

from densebeam.index_store.encoding import bert_family

log = logging.getLogger(__name__)

MODES = ("fp32", "int16", "bf16-mixed", "bf16", "fp16")
ATTENTIONS = ("auto", "native", "groups", "padded")
ROW_MULTIPLE = 256
SMALL_ROW_MULTIPLE = 16  # for calls of at most ROW_MULTIPLE rows (a query): little padding, few shapes


def packed_support(st) -> Optional[str]:
    """Why ``st`` cannot run packed (a short reason), or None when it can: a sentence-transformers model
    of exactly [Transformer(a BERT-family encoder with absolute positions, :mod:`index_store.encoding.bert_family`),
    Pooling(mean or cls), optional Normalize]."""
    from sentence_transformers import models as st_models

    mods = list(st)
    if len(mods) not in (2, 3) or not isinstance(mods[0], st_models.Transformer):
        return "modules are not [Transformer, Pooling, Normalize?]"
    if not isinstance(mods[1], st_models.Pooling) or (len(mods) == 3 and
                                                      not isinstance(mods[2], st_models.Normalize)):
        return "modules are not [Transformer, Pooling, Normalize?]"
    auto = getattr(mods[0], "auto_model", None)
    cfg = getattr(auto, "config", None)
    if cfg is None:
        return f"the transformer is {type(auto).__name__}, without a config"
    why = bert_family.unsupported(cfg.to_dict())
    if why:
        return why
    if _pooling_mode(mods[1]) is None:
        return "pooling is neither mean nor cls"
    if getattr(mods[0], "do_lower_case", False) and not mods[0].tokenizer.is_fast:
        return "a slow tokenizer"
    return None


def _pooling_mode(pooling) -> Optional[str]:
    cfg = pooling.get_config_dict() if hasattr(pooling, "get_config_dict") else {}
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        mode = mode.lower()
    elif getattr(pooling, "pooling_mode_mean_tokens", False):
        mode = "mean"
    elif getattr(pooling, "pooling_mode_cls_token", False):
        mode = "cls"
    if mode not in ("mean", "cls") or cfg.get("include_prompt") is False:
        return None
    return mode


class PackedBert:
    """The weights of one BERT encoder laid out for packed inference in one compute mode.

    ``__call__(ids, lengths)`` takes the token ids of passages ordered by length (longest first or
    shortest first: only that equal lengths are adjacent matters) concatenated into one int64 array, and
    their lengths; returns the pooled (n, hidden) float32 embeddings in the same order.
    """

    def __init__(self, config: dict, weights: dict, pooling: str, mode: str, device: str = "cpu",
                 attention: str = "auto", fused_layernorm: Optional[bool] = None, position_offset: int = 0,
                 build_native: bool = True):
        """``config``: a BERT config as a dict; ``weights``: tensors by ``BertModel`` state-dict names
        (token-type embeddings optional); ``pooling``: ``mean`` or ``cls``; ``position_offset``: added to
        each token's index to give its position id (2 for RoBERTa). Built by
        :meth:`from_sentence_transformer` or :meth:`from_files`, which map the other BERT-family
        architectures to this layout (:mod:`index_store.encoding.bert_family`). ``build_native=False``: use the
        native kernels only if this machine has built them already (never wait for a compiler)."""
        import torch

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, got {pooling!r}")
        self.mode, self.device = mode, torch.device(device)
        self.pooling = pooling
        self.heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.act = config.get("hidden_act", "gelu")
        self.mm_dtype = {"fp32": torch.float32, "int16": torch.float32, "bf16-mixed": torch.bfloat16,
                         "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        # the residual stream and layer norms: float32 except in the all-low-precision modes
        self.stream_dtype = torch.float32 if mode in ("fp32", "int16", "bf16-mixed") else self.mm_dtype
        self._native = None
        self._build_native = build_native
        # int16: the matrix products in the native int16 library, everything else as fp32
        self._int16 = self._int16_kernels(config) if mode == "int16" else None
        self.attention = self._choose_attention(attention)
        # Each residual add and its layer norm in one native pass (with the native attention only).
        # fp32: PyTorch's float32 arithmetic in one pass instead of two. bf16-mixed: the float32 arithmetic
        # of PyTorch's path (float(a) + h, float32 statistics) but for the order of the statistics' sums,
        # and the bf16 copy of the result that the next product takes written in the same pass (PyTorch: a
        # conversion, an add, a layer norm and another conversion, four passes). bf16 (a bf16 residual
        # stream): off unless asked: the kernel keeps the sum in float32 where PyTorch rounds it to bf16
        # first, and that moved one collection's NDCG@10 past the 0.005 fidelity bar
        if fused_layernorm is None:
            fused_layernorm = mode in ("fp32", "int16", "bf16-mixed")
        self.fused_layernorm = bool(fused_layernorm) and self.attention == "native"
        self._ln32: list = []
        # oneDNN with weights pre-packed in its blocked layout (no per-call weight reorder): bf16, and fp32,
        # where it runs at the core's peak while the MKL products of F.linear take an AVX2 path on AMD CPUs
        # (same float32 arithmetic in another summation order)
        self._pack = (self.device.type == "cpu" and self.mm_dtype in (torch.bfloat16, torch.float32)
                      and self._int16 is None and _onednn_ok(self.mm_dtype))
        # oneDNN builds a kernel per new row count (a batch of a new shape is slower than a repeat); rows are
        # padded to a multiple of this so a run reuses a few dozen shapes at < 3% extra rows; a call of at
        # most that many rows (one query) is padded to a multiple of SMALL_ROW_MULTIPLE only
        self.row_multiple = ROW_MULTIPLE if self._pack else SMALL_ROW_MULTIPLE if self._int16 else 1

        def w(name, dtype=None):
            t = weights[name].detach().to(torch.float32)
            return t.to(self.device, dtype or torch.float32).contiguous()

        self.word = w("embeddings.word_embeddings.weight")
        self.pos = w("embeddings.position_embeddings.weight")
        self.position_offset = int(position_offset)
        self.types = (w("embeddings.token_type_embeddings.weight") if "embeddings.token_type_embeddings.weight"
                      in weights else None)
        self.type0 = self.types[0].contiguous() if self.types is not None else torch.zeros(self.hidden, device=self.device)
        self.emb_ln = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        scale = (self.hidden // self.heads) ** -0.5
        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            # one (3 * hidden, hidden) product for q, k and v; the 1/sqrt(head dim) score scale is folded
            # into the query weights (no scaling pass over the scores)
            qkv_w = torch.cat([w(p + "attention.self.query.weight") * scale, w(p + "attention.self.key.weight"),
                               w(p + "attention.self.value.weight")])
            qkv_b = torch.cat([w(p + "attention.self.query.bias") * scale, w(p + "attention.self.key.bias"),
                               w(p + "attention.self.value.bias")])
            self.layers.append((
                self._linear(qkv_w, qkv_b),
                self._linear(w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias")),
                (w(p + "attention.output.LayerNorm.weight", self.stream_dtype),
                 w(p + "attention.output.LayerNorm.bias", self.stream_dtype)),
                self._linear(w(p + "intermediate.dense.weight"), w(p + "intermediate.dense.bias")),
                self._linear(w(p + "output.dense.weight"), w(p + "output.dense.bias")),
                (w(p + "output.LayerNorm.weight", self.stream_dtype), w(p + "output.LayerNorm.bias", self.stream_dtype)),
            ))
            if self.fused_layernorm and mode == "bf16":  # its native add + layer norm takes float32 weights
                self._ln32.append(((w(p + "attention.output.LayerNorm.weight"), w(p + "attention.output.LayerNorm.bias")),
                                   (w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias"))))

    def _int16_kernels(self, config: dict):
        """The native int16 library for this model's products; ValueError when it cannot run them."""
        from densebeam.index_store.encoding import native

        if self.device.type != "cpu":
            raise ValueError("int16 runs on a CPU only")
        kernel = native.kernels("int16", build=self._build_native)
        if kernel is None:
            why = native.why_not("int16") or "not built on this machine yet"
            raise ValueError(f"int16 products unavailable: {why}")
        widths = (3 * self.hidden, self.hidden, int(config.get("intermediate_size", 4 * self.hidden)))
        why = kernel.shape_problem(widths) or (None if SMALL_ROW_MULTIPLE % kernel.rows == 0 else
                                               f"row tiles of {kernel.rows}")
        if why:
            raise ValueError(f"int16 products cannot run this model: {why}")
        return kernel

    def _choose_attention(self, asked: str) -> str:
        """native: the C kernels (:mod:`index_store.encoding.native`) on a CPU, float32 or bf16 products; groups:
        one small PyTorch attention batch per length, no mask (CPU: no kernel-launch cost); padded: one
        masked call per layer for the whole batch (GPU: few launches). ``auto``: native where it can
        run, else groups on a CPU and padded on a GPU."""
        import torch

        if asked in ("auto", "native"):
            why = self._native_problem()
            if why is None:
                return "native"
            if asked == "native":
                raise ValueError(f"native attention unavailable: {why}")
            return "groups" if self.device.type == "cpu" else "padded"
        return asked

    def _native_problem(self) -> Optional[str]:
        """Why the native kernels cannot run this forward (None: they can, and ``self._native`` is set)."""
        import torch

        from densebeam.index_store.encoding import native

        if self.device.type != "cpu" or self.mm_dtype not in (torch.bfloat16, torch.float32):
            return "they run float32 or bf16 products on a CPU only"
        kind = "fp32" if self.mm_dtype == torch.float32 else "bf16"
        if kind == "bf16" and (shape := native_shape_problem(self.hidden, self.heads)) is not None:
            return shape
        kernel = native.kernels(kind, build=self._build_native)
        if kernel is None:
            return native.why_not(kind) or "not built on this machine yet"
        if kind == "fp32" and (shape := kernel.shape_problem(self.hidden, self.heads)) is not None:
            return shape
        self._native = kernel
        return None

    @classmethod
    def from_sentence_transformer(cls, st, mode: str, device: str = "cpu", attention: str = "auto",
                                  fused_layernorm: Optional[bool] = None, build_native: bool = True) -> "PackedBert":
        reason = packed_support(st)
        if reason:
            raise ValueError(f"model cannot run packed: {reason}")
        encoder = st[0].auto_model
        lay = bert_family.layout(encoder.config.to_dict())
        return cls(lay.config, bert_family.bert_weights(lay.model_type, encoder.state_dict()), _pooling_mode(st[1]),
                   mode, device, attention, fused_layernorm, lay.position_offset, build_native)

    @classmethod
    def from_files(cls, files, mode: str, device: str = "cpu", attention: str = "auto",
                   build_native: bool = True) -> "PackedBert":
        """From :class:`index_store.encoding.model_files.BertFiles` (no sentence-transformers import)."""
        lay = bert_family.layout(files.config)
        return cls(lay.config, bert_family.bert_weights(lay.model_type, files.weights()), files.pooling, mode,
                   device, attention, position_offset=lay.position_offset, build_native=build_native)

    # -- weights --------------------------------------------------------------------------------
    def _linear(self, w, b):
        import torch

        if self._int16 is not None:
            return self._int16.pack(w, b)
        w = w.to(self.mm_dtype).contiguous()
        b = b.to(self.mm_dtype).contiguous()
        if self._pack:
            # oneDNN's blocked layout, done once: a plain F.linear reorders a bf16 weight every call
            w = torch.ops.mkldnn._reorder_linear_weight(w, 4096)
        return w, b

    def _mm(self, x, wb, act: str = "none"):
        import torch

        if self._int16 is not None:
            fused = act == "gelu" and self.act == "gelu"
            y = self._int16.linear(x.contiguous(), wb, gelu=fused)
            return self._activation(y) if act == "gelu" and not fused else y
        w, b = wb
        if self._pack:
            if act == "gelu" and self.act == "gelu":
                return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
            y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        else:
            y = torch.nn.functional.linear(x, w, b)
        if act == "gelu":
            y = self._activation(y)
        return y

    def _activation(self, y):
        import torch

        if self.act == "gelu":
            return torch.nn.functional.gelu(y)
        if self.act == "relu":
            return torch.relu(y)
        return torch.nn.functional.gelu(y, approximate="tanh")

    # -- forward --------------------------------------------------------------------------------
    def __call__(self, ids: np.ndarray, lengths: Sequence[int], types: Optional[np.ndarray] = None):
        """Pooled (n, hidden) float32 embeddings of the passages whose token ids ``ids`` holds (see the
        class). ``types``: each token's token-type id (a cross-encoder's query / passage segments), as
        ``ids``; all 0 when None. With CLS pooling the last layer computes the first token of each
        passage only past its attention (the other rows are never read)."""
        import torch

        lengths = np.asarray(lengths, dtype=np.int64)
        if ids.shape[0] != int(lengths.sum()):
            raise ValueError(f"{ids.shape[0]} token ids for lengths summing to {int(lengths.sum())}")
        if types is not None and (types.shape != ids.shape or self.types is None):
            raise ValueError(f"{types.shape} token types for {ids.shape} ids"
                             + (" (the model has no token-type embeddings)" if self.types is None else ""))
        groups = _length_groups(lengths)  # (first row, passages, length) of each run of equal lengths
        positions = np.concatenate([np.tile(np.arange(length), n) for _, n, length in groups])
        dev = self.device
        # rows no passage owns: computed, never read
        spare = self._spare(len(ids))
        if spare and self.attention != "padded":
            ids, positions = np.pad(ids, (0, spare)), np.pad(positions, (0, spare))
            types = None if types is None else np.pad(types, (0, spare))
        ids_t = torch.from_numpy(ids).to(dev)
        pos_t = torch.from_numpy(positions + self.position_offset).to(dev)
        attend = {"native": self._attend_native, "groups": self._attend_groups}.get(self.attention) \
            or self._attend_padded(lengths, positions)
        h = self.word.index_select(0, ids_t) + self.pos.index_select(0, pos_t)
        h += self.type0 if types is None else self.types.index_select(0, torch.from_numpy(types).to(dev))
        h = torch.nn.functional.layer_norm(h, (self.hidden,), *self.emb_ln, self.eps).to(self.stream_dtype)
        hb = h.to(self.mm_dtype)  # the products' input: h itself unless the stream is float32
        last = len(self.layers) - 1
        for i, (qkv_wb, out_wb, ln1, up_wb, down_wb, ln2) in enumerate(self.layers):
            ln32 = self._ln32[i] if self._ln32 else (None, None)
            ctx = attend(self._mm(hb, qkv_wb), groups)
            if i == last and self.pooling == "cls":  # only each passage's first row goes on
                keep = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                keep = torch.from_numpy(np.pad(keep, (0, self._spare(len(keep))))).to(dev)
                ctx, same = ctx[keep], hb is h
                h = h[keep]
                hb = h if same else hb[keep]
            h, hb = self._residual(self._mm(ctx, out_wb), h, hb, ln1, ln32[0])
            h, hb = self._residual(self._mm(self._mm(hb, up_wb, act="gelu"), down_wb), h, hb, ln2, ln32[1])
        if self.pooling == "cls":
            return h[:len(lengths)].float()
        return self._pool(h, lengths)

    def _spare(self, rows: int) -> int:
        """Rows to add to ``rows`` so products see one of a few shapes (:data:`ROW_MULTIPLE`)."""
        return (-rows) % (self.row_multiple if rows > self.row_multiple else min(self.row_multiple, SMALL_ROW_MULTIPLE))

    def _residual(self, x, h, hb, norm, norm32):
        """One residual connection, h <- LayerNorm(x + h): returns (h, hb), hb the next product's input.
        bf16-mixed with the native kernels: one pass writes the float32 h and its bf16 copy hb, both in
        place; bf16 fused: the native kernel with float32 weights ``norm32``; else PyTorch's operations."""
        import torch

        if self.fused_layernorm and self.mode == "bf16-mixed":
            self._native.add_layernorm_mixed(x, h, *norm, self.eps, hb)
            return h, hb
        if self.fused_layernorm and self.mode in ("fp32", "int16"):
            self._native.add_layernorm(x, h, *norm, self.eps)
            return h, h
        if self.fused_layernorm:
            h = self._native.add_layernorm(x, h, *norm32, self.eps)
            return h, h
        h = torch.nn.functional.layer_norm(x.to(self.stream_dtype) + h, (self.hidden,), *norm, self.eps)
        return h, h.to(self.mm_dtype)

    @property
    def kernels(self) -> str:
        """``native`` when the native kernels (:mod:`index_store.encoding.native`) run in this forward, else
        ``torch``."""
        return "native" if self.attention == "native" else "torch"

    def _attend_native(self, qkv, groups):
        """CPU: every group and head in one call of the C kernel (:mod:`index_store.encoding.native`)."""
        import torch

        ctx = torch.empty((qkv.shape[0], self.hidden), dtype=qkv.dtype, device=qkv.device)
        used = groups[-1][0] + groups[-1][1] * groups[-1][2]
        ctx[used:] = 0  # spare rows (row_multiple)
        self._native.attend(qkv.contiguous(), ctx, groups, self.heads, self.hidden // self.heads)
        return ctx

    def _attend_groups(self, qkv, groups):
        """CPU: the passages of one length as one (n, heads, length, head dim) batch, no mask. Scores
        by batched matrix products in the compute dtype, softmax in float32 (faster than
        ``scaled_dot_product_attention``'s CPU kernel at these sizes: head dim 32, lengths < 256)."""
        import torch

        hd = self.hidden // self.heads
        ctx = torch.empty((qkv.shape[0], self.hidden), dtype=qkv.dtype, device=qkv.device)
        used = groups[-1][0] + groups[-1][1] * groups[-1][2]
        ctx[used:] = 0  # spare rows (row_multiple)
        for row, n, length in groups:
            q, k, v = qkv[row:row + n * length].view(n, length, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            scores = torch.matmul(q, k.transpose(-1, -2))  # the scale is folded into the query weights
            probs = torch.softmax(scores.float(), dim=-1).to(qkv.dtype)
            ctx[row:row + n * length] = torch.matmul(probs, v).transpose(1, 2).reshape(n * length, self.hidden)
        return ctx

    def _attend_padded(self, lengths: np.ndarray, positions: np.ndarray):
        """GPU: one fused attention call for the whole batch: the rows are scattered into a padded
        (passages, longest) layout for ``scaled_dot_product_attention`` with a key mask (batches are
        length-sorted, so the padding is small) and gathered back. (Flash attention over the packed rows,
        ``torch.nn.attention.varlen``, would skip the padding too; not used until measured on a GPU.)"""
        import torch

        dev, hd = self.device, self.hidden // self.heads
        n, longest = len(lengths), int(lengths.max())
        seq = np.repeat(np.arange(n), lengths)
        dest = torch.from_numpy(seq * longest + positions).to(dev)
        valid = torch.arange(longest, device=dev)[None, :] < torch.from_numpy(lengths).to(dev)[:, None]
        mask = valid[:, None, None, :]

        def attend(qkv, groups):
            padded = qkv.new_zeros((n * longest, qkv.shape[1]))
            padded[dest] = qkv
            q, k, v = padded.view(n, longest, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            return out.transpose(1, 2).reshape(n * longest, self.hidden)[dest]

        return attend

    def _pool(self, h, lengths: np.ndarray):
        """Mean over each passage's tokens, in float32."""
        import torch

        seq = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)).to(h.device)
        sums = torch.zeros((len(lengths), self.hidden), dtype=torch.float32, device=h.device)
        sums.index_add_(0, seq, h[:len(seq)].float())
        return sums / torch.from_numpy(lengths).to(h.device, torch.float32)[:, None]


def native_shape_problem(hidden: int, heads: int) -> Optional[str]:
    """Why the native kernels cannot run a model of this width and head count (None: they can): the
    attention takes head sizes that are multiples of 32, the add + layer norm rows of a multiple of 16
    values, at most 4,096."""
    if heads <= 0 or hidden % heads or (hidden // heads) % 32:
        return f"head size {hidden}/{heads} is not a multiple of 32"
    if hidden % 16 or hidden > 4096:
        return f"hidden size {hidden} is not a multiple of 16 up to 4096"
    return None


def _length_groups(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal consecutive lengths as (first token row, count, length)."""
    if not len(lengths):
        return []
    cut = np.flatnonzero(np.diff(lengths)) + 1
    starts = np.concatenate([[0], cut])
    counts = np.diff(np.concatenate([starts, [len(lengths)]]))
    rows = np.concatenate([[0], np.cumsum(lengths)])[starts]
    return [(int(r), int(c), int(lengths[s])) for r, c, s in zip(rows, counts, starts)]


@functools.lru_cache(maxsize=None)
def _onednn_ok(dtype) -> bool:
    """oneDNN's packed linear is there and works on this CPU for this torch dtype (checked once on a
    tiny product)."""
    import torch

    try:
        w = torch.ones(8, 4, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4, dtype=dtype), packed,
                                               torch.zeros(8, dtype=dtype), "none", [], "")
        return bool(torch.all(y == 4))
    except Exception as err:  # noqa: BLE001 - an optional fast path; plain F.linear is the fallback
        log.info("oneDNN packed linear unavailable (%s); using torch.nn.functional.linear", err)
        return False
