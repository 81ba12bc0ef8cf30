"""Read a sentence-transformers BERT-family model directory (BERT, DistilBERT, RoBERTa, XLM-RoBERTa:
:mod:`index_store.encoding.bert_family`) without importing sentence-transformers or transformers. No Beam import.

Importing sentence-transformers costs seconds (it pulls in transformers and scikit-learn: 3-4 s on an
idle 2-core machine, 16-25 s measured while the cores were shared with other work), which is most of
an encode job's start-up. A directory of the common layout is read here directly: ``modules.json`` naming
[Transformer, Pooling, Normalize?], a BERT-family ``config.json``, ``model.safetensors``, ``tokenizer.json``
(the ``tokenizers`` library, exactly what transformers' fast tokenizer wraps) and the pooling config.
Anything else returns a reason and is loaded by sentence-transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from densebeam.index_store.encoding import bert_family

# what sentence-transformers 6 writes for a plain text embedding model
_FEATURE_EXTRACTION = {"transformer_task": "feature-extraction",
                       "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
                       "module_output_name": "token_embeddings"}


def _is(type_name, cls: str) -> bool:
    """A sentence-transformers module class by name, wherever the version puts it
    (``sentence_transformers.models.Pooling``, ``...sentence_transformer.modules.pooling.Pooling``)."""
    return isinstance(type_name, str) and type_name.startswith("sentence_transformers.") \
        and type_name.rsplit(".", 1)[-1] == cls


@dataclasses.dataclass
class BertFiles:
    """What a packed forward pass and its tokenizer need, read from a model directory."""

    path: str
    config: dict[str, Any]  # the model's config.json
    pooling: str  # "mean" or "cls"
    normalize: bool  # a Normalize module follows the pooling
    max_seq_length: int
    similarity_fn: Optional[str]  # config_sentence_transformers.json's similarity_fn_name
    weights_file: str
    tokenizer_file: str
    prompts: dict = dataclasses.field(default_factory=dict)  # config_sentence_transformers.json's prompts
    default_prompt_name: Optional[str] = None

    @property
    def dim(self) -> int:
        return int(bert_family.layout(self.config).config["hidden_size"])

    def weights(self) -> dict:
        """The weights as the file names them (:func:`index_store.encoding.bert_family.bert_weights` maps them to
        BERT's layout)."""
        from safetensors.torch import load_file

        return load_file(self.weights_file)

    def tokenizer(self, max_length: int):
        """A ``tokenizers.Tokenizer`` set as transformers sets it for ``tok(texts, truncation=True,
        max_length=max_length)``: truncation at max_length, no padding (the file's own settings, e.g. a
        fixed padding to 128, are what every transformers call overrides)."""
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(self.tokenizer_file)
        tk.enable_truncation(max_length=max_length)
        tk.no_padding()
        return tk


def read_bert_directory(path: str) -> tuple[Optional[BertFiles], str]:
    """(files, "") for a directory this module can load, else (None, why not)."""
    try:
        modules = _json(path, "modules.json")
    except (OSError, ValueError) as err:
        return None, f"no readable modules.json ({err})"
    types = [m.get("type") for m in modules]
    if not (len(types) in (2, 3) and _is(types[0], "Transformer") and _is(types[1], "Pooling")
            and (len(types) == 2 or _is(types[2], "Normalize"))):
        return None, f"modules are {types}, not [Transformer, Pooling, Normalize?]"
    tdir = os.path.join(path, modules[0].get("path") or "")
    try:
        config = _json(tdir, "config.json")
        st_cfg = _json(tdir, "sentence_bert_config.json") if _has(tdir, "sentence_bert_config.json") \
            else _json(path, "sentence_bert_config.json")
        pool_cfg = _json(os.path.join(path, modules[1].get("path") or ""), "config.json")
    except (OSError, ValueError) as err:
        return None, f"config files missing or unreadable ({err})"
    weights, tok = os.path.join(tdir, "model.safetensors"), os.path.join(tdir, "tokenizer.json")
    reason = _unsupported(config, st_cfg, pool_cfg, weights, tok)
    if reason:
        return None, reason
    # sentence-transformers < 6 writes max_seq_length to sentence_bert_config.json, 6 to the tokenizer's
    # model_max_length; either is capped at the position embeddings, as sentence-transformers does
    msl = st_cfg.get("max_seq_length") or (_json(tdir, "tokenizer_config.json").get("model_max_length")
                                           if _has(tdir, "tokenizer_config.json") else None)
    if not msl:
        return None, "no max_seq_length in sentence_bert_config.json or tokenizer_config.json"
    msl = min(int(msl), int(config.get("max_position_embeddings", 512)))
    st_model_cfg = _json(path, "config_sentence_transformers.json") \
        if _has(path, "config_sentence_transformers.json") else {}
    prompts = st_model_cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        return None, "prompts that are not strings"
    sim = st_model_cfg.get("similarity_fn_name")
    pooling = "cls" if pool_cfg.get("pooling_mode_cls_token") or pool_cfg.get("pooling_mode") == "cls" else "mean"
    return BertFiles(path=path, config=config, pooling=pooling, normalize=len(types) == 3, max_seq_length=msl,
                     similarity_fn=sim, weights_file=weights, tokenizer_file=tok, prompts=prompts,
                     default_prompt_name=st_model_cfg.get("default_prompt_name") or None), ""


def _unsupported(config, st_cfg, pool_cfg, weights, tok) -> str:
    why = bert_family.unsupported(config)
    if why:
        return why
    if st_cfg.get("do_lower_case"):
        return "sentence_bert_config.json asks for lower-casing"
    unknown = {k: v for k, v in st_cfg.items() if k not in ("max_seq_length", "do_lower_case")
               and _FEATURE_EXTRACTION.get(k, object()) != v}
    if unknown:
        return f"sentence_bert_config.json sets {sorted(unknown)}"
    mode = pool_cfg.get("pooling_mode")
    mean = pool_cfg.get("pooling_mode_mean_tokens") or mode == "mean"
    cls = pool_cfg.get("pooling_mode_cls_token") or mode == "cls"
    others = [k for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v
              and k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token")]
    if mean == cls or others or pool_cfg.get("include_prompt") is False or (mode and mode not in ("mean", "cls")):
        return "pooling is not exactly one of mean or cls"
    if not os.path.isfile(weights) or not os.path.isfile(tok):
        return "no model.safetensors or tokenizer.json"
    return ""


def _has(path: str, name: str) -> bool:
    return os.path.isfile(os.path.join(path, name))


def _json(path: str, name: str):
    with open(os.path.join(path, name), encoding="utf-8") as f:
        return json.load(f)
