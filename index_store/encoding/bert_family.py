"""The BERT-family encoders the packed forward runs, mapped to BERT's layout. No Beam import.

BERT, DistilBERT, RoBERTa and XLM-RoBERTa are the same post-layer-norm transformer encoder with absolute
position embeddings; they differ in weight names, in where positions start (RoBERTa's position ids begin
after the padding index) and in whether token-type embeddings exist (DistilBERT has none). A model's
config and weights are translated here into one description, :class:`Layout`, with weights under
``BertModel``'s names, so :class:`index_store.encoding.packed_bert.PackedBert` knows one architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_PREFIXES = {"bert": "bert.", "distilbert": "distilbert.", "roberta": "roberta.", "xlm-roberta": "roberta."}
_DISTILBERT_NAMES = {  # per layer: DistilBERT's name -> BertModel's
    "attention.q_lin": "attention.self.query", "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value", "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm", "ffn.lin1": "intermediate.dense", "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm"}


@dataclasses.dataclass
class Layout:
    """One encoder in BERT's terms: ``config`` holds ``hidden_size``, ``num_attention_heads``,
    ``num_hidden_layers``, ``hidden_act`` and ``layer_norm_eps``; ``position_offset`` is added to each
    token's index to give its position id."""

    model_type: str
    config: dict[str, Any]
    position_offset: int


def unsupported(config: dict) -> Optional[str]:
    """Why a transformers config cannot run packed (a short reason), or None when it can."""
    mtype = config.get("model_type")
    if mtype not in MODEL_TYPES:
        return f"model type {mtype}, not one of {', '.join(MODEL_TYPES)}"
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return "a decoder"
    if config.get("position_embedding_type", "absolute") not in (None, "absolute"):
        return "relative position embeddings"
    act = config.get("activation") if mtype == "distilbert" else config.get("hidden_act")
    if act not in ACTIVATIONS:
        return f"activation {act}"
    return None


def layout(config: dict) -> Layout:
    """The :class:`Layout` of a supported config (:func:`unsupported` says which are)."""
    why = unsupported(config)
    if why:
        raise ValueError(f"model cannot run packed: {why}")
    mtype = config["model_type"]
    if mtype == "distilbert":
        cfg = {"hidden_size": config["dim"], "num_attention_heads": config["n_heads"],
               "num_hidden_layers": config["n_layers"], "hidden_act": config["activation"],
               "layer_norm_eps": 1e-12}  # fixed in DistilBERT's modules
        return Layout(mtype, cfg, 0)
    cfg = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "hidden_act")}
    cfg["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    # RoBERTa numbers the positions of real tokens from padding_idx + 1 (the pad token's id)
    offset = int(config.get("pad_token_id", 1)) + 1 if mtype in ("roberta", "xlm-roberta") else 0
    return Layout(mtype, cfg, offset)


def bert_weights(model_type: str, weights: dict) -> dict:
    """``weights`` (a state dict, with or without its model prefix, e.g. ``roberta.``) under
    ``BertModel``'s names; heads and poolers the encoder does not use are left out."""
    prefix = _PREFIXES[model_type]
    out = {}
    for name, tensor in weights.items():
        if name.startswith(prefix):
            name = name[len(prefix):]
        if model_type == "distilbert" and name.startswith("transformer.layer."):
            _, _, index, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            if module not in _DISTILBERT_NAMES:
                continue
            name = f"encoder.layer.{index}.{_DISTILBERT_NAMES[module]}.{kind}"
        if name.startswith(("embeddings.", "encoder.layer.")):
            out[name] = tensor
    return out


def classification_head(model_type: str, weights: dict) -> Optional[tuple]:
    """The one-output classification head of a ``*ForSequenceClassification`` model as (dense weight,
    dense bias, activation, output weight, output bias), or None when ``weights`` holds none: BERT's
    pooler (tanh) and classifier, RoBERTa's classifier.dense (tanh) and out_proj, DistilBERT's
    pre_classifier (ReLU) and classifier."""
    names = {"bert": ("bert.pooler.dense", "tanh", "classifier"),
             "roberta": ("classifier.dense", "tanh", "classifier.out_proj"),
             "xlm-roberta": ("classifier.dense", "tanh", "classifier.out_proj"),
             "distilbert": ("pre_classifier", "relu", "classifier")}[model_type]
    dense, act, out = names
    keys = [f"{dense}.weight", f"{dense}.bias", f"{out}.weight", f"{out}.bias"]
    if not all(k in weights for k in keys):
        return None
    return weights[keys[0]], weights[keys[1]], act, weights[keys[2]], weights[keys[3]]
