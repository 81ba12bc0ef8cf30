"""Would int8 keep the fidelity bar? Simulated int8 (values rounded to an int8 grid, arithmetic in
float32: the rounding an int8 matrix product does, without its speed) of the packed forward's matrix
products, against fp32 on the shared collections: NDCG@10 and the mean top-10 overlap of the judged
queries' results, documents and queries both encoded by the variant (``--docs-only``: queries in fp32, as
the query side encodes them).

    .venv/bin/python bench/int8_fidelity.py                                  # W8A8, every product
    .venv/bin/python bench/int8_fidelity.py --keep down                      # the FFN's second product in fp32
    .venv/bin/python bench/int8_fidelity.py --keep qkv,up
    .venv/bin/python bench/int8_fidelity.py --smooth 0.5                     # SmoothQuant, calibrated on the corpus
    .venv/bin/python bench/int8_fidelity.py --weights-only [--docs-only]

Weights: per output channel, symmetric, 127 levels; activations: per token (row), symmetric; SmoothQuant
divides each input channel by max|x|^a / max|w|^(1-a) measured on 256 passages of the collection.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PRODUCTS = ("qkv", "out", "up", "down")  # the four matrix products of a layer, in PackedBert's order


class _Int8Products:
    """Replaces PackedBert's product with its int8-rounded version while ``active``; ``calibrating``
    records each product input's per-channel maximum instead."""

    def __init__(self, keep, smooth, weights_only, wbits=8, abits=8):
        import torch

        self.torch, self.keep, self.smooth, self.weights_only = torch, set(keep), smooth, weights_only
        self.wlev, self.alev = 2 ** (wbits - 1) - 1, 2 ** (abits - 1) - 1
        self.active = self.calibrating = False
        self.count, self.stats, self.cache = 0, {}, {}

    def linear(self, bert, w, b):
        k = self.count
        self.count += 1
        return (w.contiguous(), b.contiguous(), k)

    def mm(self, bert, x, wb, act="none"):
        torch = self.torch
        w, b, k = wb
        if self.calibrating:
            m = x.abs().amax(0)
            self.stats[k] = torch.maximum(self.stats.get(k, m), m)
        elif self.active and PRODUCTS[k % 4] not in self.keep:
            if k not in self.cache:
                s = torch.ones(w.shape[1])
                if self.smooth:
                    s = (self.stats[k].clamp(min=1e-5) ** self.smooth
                         / w.abs().amax(0).clamp(min=1e-5) ** (1 - self.smooth)).clamp(min=1e-5)
                ww = w * s
                scale = ww.abs().amax(1, keepdim=True).clamp(min=1e-12) / self.wlev
                self.cache[k] = (s, torch.round(ww / scale).clamp(-self.wlev, self.wlev) * scale)
            s, wq = self.cache[k]
            x = x / s
            if not self.weights_only:
                scale = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / self.alev
                x = torch.round(x / scale).clamp(-self.alev, self.alev) * scale
            w = wq
        y = torch.nn.functional.linear(x, w, b)
        return bert._activation(y) if act == "gelu" else y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collections", default="adi,cisi,cranfield,dl19-subset")
    p.add_argument("--keep", default="", help="products left in fp32: any of qkv,out,up,down")
    p.add_argument("--smooth", type=float, default=0.0, help="SmoothQuant's alpha (0: off)")
    p.add_argument("--weights-only", action="store_true", help="round the weights only")
    p.add_argument("--docs-only", action="store_true", help="queries in fp32")
    p.add_argument("--wbits", type=int, default=8, help="weight bits (symmetric, per output channel)")
    p.add_argument("--abits", type=int, default=8, help="activation bits (symmetric, per token)")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "bench"))
    from encode_bench import joined

    from densebeam.index_store.encoding import encoder as encoder_mod
    from densebeam.index_store.encoding import packed_bert as pb
    from densebeam.index_store.query.evaluate import evaluate, read_qrels, read_queries

    q8 = _Int8Products([k for k in args.keep.split(",") if k], args.smooth, args.weights_only, args.wbits, args.abits)
    pb.PackedBert._linear = lambda self, w, b: q8.linear(self, w, b)
    pb.PackedBert._mm = lambda self, x, wb, act="none": q8.mm(self, x, wb, act)
    pb.PackedBert._native_problem = lambda self: "int8 simulation: PyTorch's products"
    encoder_mod._LOADED.clear()
    enc = encoder_mod.load_encoder("bundled", precision="fp32", device="cpu")
    print(f"W{args.wbits}A{args.abits} simulation: keep {sorted(q8.keep) or 'none'} in fp32, smooth {args.smooth}, "
          f"{'weights only' if args.weights_only else 'weights and activations'}, "
          f"{'queries fp32' if args.docs_only else 'queries int8 too'}")
    for coll in args.collections.split(","):
        base = SHARED / coll
        docs = [json.loads(line) for line in open(base / "corpus.jsonl", encoding="utf-8")]
        ids, texts = [d["_id"] for d in docs], [joined(d) for d in docs]
        queries, qrels = read_queries(str(base / "queries.jsonl")), read_qrels(str(base / "qrels.tsv"))
        qids = [q for q in queries if q in qrels]
        q8.stats, q8.cache = {}, {}
        q8.calibrating = True
        enc.encode([texts[i] for i in np.unique(np.linspace(0, len(texts) - 1, 256).astype(int))])
        q8.calibrating = False
        out = {}
        for variant in ("fp32", "int8"):
            q8.active = variant == "int8"
            d = enc.encode(texts)
            q8.active = variant == "int8" and not args.docs_only
            q = enc.encode([queries[x] for x in qids], role="query")
            s = q @ d.T
            top = np.argsort(-s, axis=1, kind="stable")[:, :10]
            run = {qq: {ids[j]: float(s[i, j]) for j in top[i]} for i, qq in enumerate(qids)}
            out[variant] = (d, top, evaluate(qrels, run, qids).metrics["ndcg@10"])
        (d0, t0, n0), (d1, t1, n1) = out["fp32"], out["int8"]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(t0, t1)])
        cos = np.min(np.sum(d0 * d1, 1) / np.linalg.norm(d0, axis=1) / np.linalg.norm(d1, axis=1))
        ok = overlap >= 0.98 and abs(n1 - n0) <= 0.005
        print(f"{coll:12s} NDCG@10 {n0:.4f} -> {n1:.4f} ({n1 - n0:+.4f})  top-10 overlap {overlap:.4f}  "
              f"min cosine {cos:.5f}  {'faithful' if ok else 'NOT faithful'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
