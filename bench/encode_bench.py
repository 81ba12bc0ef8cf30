"""Encode benchmark: ``densebeam encode`` end to end against every single-machine alternative a user could
pick (sentence-transformers fp32 and bf16, int8 dynamic quantization, ONNX Runtime, OpenVINO), side by
side in one run, each in a fresh process, rounds interleaved; plus the fidelity of each to fp32 on the
real collections, a profile of one encode run and peak memory.

    .venv/bin/python bench/encode_bench.py                               # speed, 5,000 dl19-subset passages, 3 rounds
    .venv/bin/python bench/encode_bench.py --n 50000 --rounds 3 --baseline-rounds 1 --alternatives st-fp32,ov,densebeam
    .venv/bin/python bench/encode_bench.py --fidelity                    # top-10 overlap, NDCG@10 vs fp32
    .venv/bin/python bench/encode_bench.py --profile                     # where one encode run's time goes
    .venv/bin/python bench/encode_bench.py --attention --n 2000 --rounds 5  # native kernels vs PyTorch ops
    .venv/bin/python bench/encode_bench.py --products --cpu-family avx2  # float32 vs int16 matrix products
    python3 bench/encode_bench.py --gpu --n 50000 --model DIR            # on a CUDA GPU, no Beam needed
    .venv/bin/python bench/encode_bench.py --memory 5000,50000           # peak RSS, each size in a fresh process

ONNX Runtime and OpenVINO are optional: ``pip install onnxruntime onnx onnxscript openvino`` (into the
environment or a folder named by ``--extra-path``); alternatives whose package is missing are skipped
and say so. sentence-transformers' own ``backend="onnx"/"openvino"`` needs ``optimum``, whose releases
pin ``transformers<5.6``: with this environment's transformers 5.x they cannot load, so the ONNX Runtime
and OpenVINO alternatives here do what those backends do (export the transformer, sentence-transformers'
tokenizer, batches of 32 sorted by length, mean pooling, normalization) with the runtimes called
directly.

Speed: the sentence-transformers-style alternatives time ``encode`` only (model load, export and a
warm-up batch excluded, a generous baseline); ``densebeam`` times ``encode.run`` (model load, the ``auto``
precision measurement, Beam start-up, read, duplicate check, encode, Parquet write, manifest), in a
process that has imported the pipeline module, with an empty cache every run (so it measures every run,
as a first run on a machine does); ``densebeam-rerun`` keeps one cache for the benchmark, so its runs
after the first adopt the remembered measurement (a re-run, the nightly job); ``densebeam-new`` keeps
the native kernels (built by its first run, as README's set-up builds them) but measures afresh every run
(a new corpus on a machine where densebeam is set up); ``densebeam-w2`` is
``--workers 2``. Ratios are against ``st-fp32`` of the same round (``--baseline-rounds N``: it runs in
the first N rounds only, later rounds use its median) and against the fastest alternative that is not
densebeam's in the same round; the summary gives each alternative's median and range over rounds and the
medians of its per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_CORPUS = SHARED / "dl19-subset" / "corpus.jsonl"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
COLLECTIONS = ("adi", "cisi", "cranfield", "dl19-subset")
ST_BATCH = 32  # SentenceTransformer.encode's default


def _scratch_dir(prefix: str) -> str:
    """A temp dir removed when this process exits (exported models are ~100 MB each)."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


# -- corpora -------------------------------------------------------------------------------------
def iter_docs(path: Path, n: int):
    """``n`` passages, streamed; the corpus is repeated with fresh ids when n is larger than the file."""
    made, round_ = 0, 0
    while made < n:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if made == n:
                    return
                d = json.loads(line)
                yield {**d, "_id": f"{d['_id']}-{round_}"}
                made += 1
        if made == 0:
            raise ValueError(f"{path} holds no passages")
        round_ += 1


def write_corpus(docs, directory: str) -> str:
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def joined(d: dict) -> str:
    """What densebeam encodes by default: BEIR-style title + text."""
    return f"{d['title']} {d['text']}" if d.get("title") else d["text"]


def read_texts(corpus: str) -> list[str]:
    with open(corpus, encoding="utf-8") as f:
        return [joined(json.loads(line)) for line in f]


# -- the alternatives ----------------------------------------------------------------------------
def _st_model():
    from sentence_transformers import SentenceTransformer

    from densebeam.index_store.encoding.encoder import resolve_model_path

    return SentenceTransformer(resolve_model_path(MODEL), device="cpu")


def _st_encoder(model):
    import numpy as np
    import torch

    def encode(texts):
        out = model.encode(texts, convert_to_tensor=True)  # defaults: batch_size 32, length-sorted
        return out.float().numpy() if out.dtype != torch.float32 else np.asarray(out)

    return encode


def make_st_fp32():
    """``SentenceTransformer(name).encode(texts)``: defaults, fp32 (the 1.00x baseline)."""
    return _st_encoder(_st_model())


def make_st_bf16():
    """The same after ``model.to(torch.bfloat16)`` (weights and activations bf16)."""
    import torch

    return _st_encoder(_st_model().to(torch.bfloat16))


def make_st_bf16_b128():
    """bf16 weights and batches of 128 instead of 32 (fewer, larger matrix products)."""
    import torch

    model = _st_model().to(torch.bfloat16)
    return lambda texts: model.encode(texts, batch_size=128, convert_to_tensor=True).float().numpy()


def make_st_bf16_t1():
    """bf16 weights with one torch thread: no barriers between threads (on a CPU shared with other work
    a multi-threaded operation waits for its slowest thread)."""
    import torch

    torch.set_num_threads(1)
    return _st_encoder(_st_model().to(torch.bfloat16))


def make_st_int8():
    """``torch.ao.quantization.quantize_dynamic`` of every Linear to int8 (VNNI kernels via fbgemm)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(_st_model(), {torch.nn.Linear}, dtype=torch.qint8)
    return _st_encoder(model)


def make_st_compile():
    """bf16 weights and ``torch.compile(dynamic=True)`` on the transformer (compile time excluded: the
    warm-up pays it, then a second warm-up at another shape)."""
    import torch

    model = _st_model().to(torch.bfloat16)
    model[0].auto_model = torch.compile(model[0].auto_model, dynamic=True)
    return _st_encoder(model)


class _ExportedEncoder:
    """What sentence-transformers' ONNX/OpenVINO backends do around a runtime: its tokenizer, batches of
    32 texts sorted by length (longest first), mean pooling over the attention mask, normalization."""

    def __init__(self, st, run):
        self.tokenizer, self.max_len, self.run = st.tokenizer, st.max_seq_length, run

    def __call__(self, texts):
        import numpy as np

        order = np.argsort([-len(t) for t in texts], kind="stable")
        chunks = []
        for i in range(0, len(texts), ST_BATCH):
            batch = [texts[j] for j in order[i:i + ST_BATCH]]
            f = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_len, return_tensors="np")
            feats = {k: f[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
            tokens = np.asarray(self.run([feats[k] for k in ("input_ids", "attention_mask", "token_type_ids")]),
                                dtype=np.float32)
            mask = feats["attention_mask"][:, :, None].astype(np.float32)
            pooled = (tokens * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            chunks.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(chunks)
        return out


def _example(st):
    enc = st.tokenizer(["a short example", "another, longer example text"], padding=True, return_tensors="pt")
    return tuple(enc[k] for k in ("input_ids", "attention_mask", "token_type_ids"))


def _traceable(st):
    """The transformer as a module of three positional tensors returning the token embeddings."""
    import torch

    class Tokens(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return Tokens(st[0].auto_model).eval()


def _export_onnx(st, path: str) -> None:
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names + ["tokens"]}
    with torch.no_grad():
        torch.onnx.export(_traceable(st), _example(st), path, input_names=names, output_names=["tokens"],
                          dynamic_axes=axes, dynamo=False, opset_version=17)


def make_ort_fp32():
    """ONNX Runtime, fp32, all graph optimizations (what ``backend="onnx"`` runs)."""
    import onnxruntime as ort

    st = _st_model()
    path = os.path.join(_scratch_dir("densebeam-onnx-"), "model.onnx")
    _export_onnx(st, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _ExportedEncoder(st, lambda feats: sess.run(None, _named(feats))[0])


def _named(feats):
    return dict(zip(("input_ids", "attention_mask", "token_type_ids"), feats))


def make_ort_int8():
    """ONNX Runtime with dynamic int8 quantization of the exported model (what sentence-transformers'
    ``export_dynamic_quantized_onnx_model(..., "avx512_vnni")`` makes)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    st = _st_model()
    tmp = _scratch_dir("densebeam-onnx-")
    _export_onnx(st, os.path.join(tmp, "model.onnx"))
    quantize_dynamic(os.path.join(tmp, "model.onnx"), os.path.join(tmp, "int8.onnx"), weight_type=QuantType.QInt8)
    sess = ort.InferenceSession(os.path.join(tmp, "int8.onnx"), providers=["CPUExecutionProvider"])
    return _ExportedEncoder(st, lambda feats: sess.run(None, _named(feats))[0])


def make_ov():
    """OpenVINO with its default CPU configuration on the converted transformer (what
    ``backend="openvino"`` runs): ``INFERENCE_PRECISION_HINT`` bf16 on CPUs with bf16 arithmetic, f32 on
    the others. (Under ``--cpu-family`` OpenVINO still sees the real CPU's bf16 and would pick bf16, which
    its capped oneDNN then emulates at ~4 passages/s: the hint is set to what it picks on such a CPU.)"""
    import openvino as ov

    from densebeam.index_store.encoding import cpu

    st = _st_model()
    config = {} if cpu.native_bf16() else {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(ov.convert_model(_traceable(st), example_input=_example(st)), "CPU", config)
    return _ExportedEncoder(st, lambda feats: compiled(feats)[0])


def make_densebeam():
    """``densebeam``'s Encoder (library call, ``auto`` precision: measured on the first texts)."""
    from densebeam.index_store.encoding.encoder import load_encoder

    return load_encoder(MODEL, precision="auto", device="cpu").encode


def make_densebeam_fp32():
    from densebeam.index_store.encoding.encoder import load_encoder

    return load_encoder(MODEL, precision="fp32", device="cpu").encode


def make_densebeam_bf16():
    from densebeam.index_store.encoding.encoder import load_encoder

    return load_encoder(MODEL, precision="bf16", device="cpu").encode


# name -> (maker, kind): "lib" alternatives are timed around encode(); "pipeline" ones run
# `densebeam encode` end to end with that precision.
ALTERNATIVES = {
    "st-fp32": (make_st_fp32, "lib"),
    "st-bf16": (make_st_bf16, "lib"),
    "st-bf16-b128": (make_st_bf16_b128, "lib"),
    "st-bf16-1thread": (make_st_bf16_t1, "lib"),
    "st-int8": (make_st_int8, "lib"),
    "st-compile-bf16": (make_st_compile, "lib"),
    "ort-fp32": (make_ort_fp32, "lib"),
    "ort-int8": (make_ort_int8, "lib"),
    "ov": (make_ov, "lib"),
    "densebeam-lib": (make_densebeam_bf16, "lib"),  # the Encoder as a library call, bf16: the pipeline's ceiling
    # Pipelines: (precision, extra flags, where the auto measurement is remembered). "fresh": an empty
    # cache per run, so every run measures (a first run on a machine); "kept": one cache for the whole
    # benchmark, so runs after the first adopt the remembered choice (a re-run, the nightly job).
    "densebeam": (("auto", (), "fresh"), "pipeline"),
    "densebeam-rerun": (("auto", (), "kept"), "pipeline"),
    # "new": a new corpus on a machine where densebeam ran before (README's set-up runs a job, which builds
    # the native kernels): the kernels are kept, the precision is measured afresh every run
    "densebeam-new": (("auto", (), "new"), "pipeline"),
    "densebeam-w2": (("auto", ("--workers", "2"), "fresh"), "pipeline"),
    "densebeam-fp32": (("fp32", (), "fresh"), "pipeline"),
}
SPEED_DEFAULT = ("st-fp32", "st-bf16", "st-int8", "ort-fp32", "ort-int8", "ov", "densebeam", "densebeam-rerun",
                 "densebeam-fp32")
FIDELITY_MAKERS = {"st-fp32": make_st_fp32, "st-bf16": make_st_bf16, "st-int8": make_st_int8,
                   "ort-fp32": make_ort_fp32, "ort-int8": make_ort_int8, "ov": make_ov,
                   "densebeam": make_densebeam, "densebeam-bf16": make_densebeam_bf16,
                   "densebeam-fp32": make_densebeam_fp32}


# Alternatives measured unfaithful to fp32 on the shared collections (--fidelity: top-10 overlap 0.70-0.83):
# never "the fastest alternative with the same fidelity"
UNFAITHFUL = ("st-int8", "ort-int8")


def machine_line() -> str:
    """The CPU as densebeam sees it (model, family after any cap, the flags that decide it), the ISA
    limits in force, and the core count."""
    from densebeam.index_store.encoding import cpu

    d = cpu.describe()
    caps = ", ".join(f"{k}={v}" for k, v in d["caps"].items()) or "none"
    ids = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("cpu family", "model") and k.strip() not in ids:
                    ids[k.strip()] = v.strip()
    except OSError:
        pass
    return (f"CPU {d['model']} (family {ids.get('cpu family', '?')} model {ids.get('model', '?')}), {os.cpu_count()} "
            f"cores, densebeam family {d['family']}; flags {' '.join(d['flags'])}; ISA limits: {caps}")


def _missing(name: str):
    """The import error that rules an alternative out here, or None."""
    need = {"ort-fp32": ("onnxruntime", "onnx", "onnxscript"), "ort-int8": ("onnxruntime", "onnx", "onnxscript"),
            "ov": ("openvino",)}.get(name, ())
    for mod in need:
        try:
            __import__(mod)
        except ImportError as err:
            return str(err)
    return None


# -- speed ---------------------------------------------------------------------------------------
KEPT_CACHE = os.path.join(tempfile.gettempdir(), "densebeam-bench-cache")  # emptied when a benchmark starts


def _child_run(name: str, corpus: str) -> dict:
    """One alternative on one corpus, in this (fresh) process."""
    maker, kind = ALTERNATIVES[name]
    if kind == "pipeline":
        from densebeam.pipelines import encode

        precision, extra, memo = maker
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DENSEBEAM_CACHE_DIR"] = KEPT_CACHE if memo == "kept" else os.path.join(tmp, "cache")
            kept_native = os.path.join(KEPT_CACHE + "-native", "native")
            if memo == "new" and os.path.isdir(kept_native):  # the kernels a set-up built, no measurement
                shutil.copytree(kept_native, os.path.join(tmp, "cache", "native"))
            start = time.perf_counter()
            manifest = encode.run(["--input", corpus, "--output", os.path.join(tmp, "out"), "--model", MODEL,
                                   "--precision", precision, "--runner", "local", "--overwrite", *extra])
            secs = time.perf_counter() - start
            if memo == "new" and not os.path.isdir(kept_native):  # the first run built them (untimed from here)
                shutil.copytree(os.path.join(tmp, "cache", "native"), kept_native)
        facts = manifest.get("model_facts") or manifest.get("facts") or {}
        return {"seconds": secs, "precision": facts.get("precision") if isinstance(facts, dict) else None}
    texts = read_texts(corpus)
    start = time.perf_counter()
    encode = maker()
    encode(texts[:ST_BATCH])  # warm-up, as any fair baseline
    encode(texts[-ST_BATCH:])
    load = time.perf_counter() - start
    start = time.perf_counter()
    encode(texts)
    return {"seconds": time.perf_counter() - start, "load_seconds": load}


def speed(args) -> None:
    names = args.alternatives.split(",") if args.alternatives else list(SPEED_DEFAULT)
    unknown = [n for n in names if n not in ALTERNATIVES]
    if unknown:
        raise SystemExit(f"unknown alternative(s) {unknown}; choose from {list(ALTERNATIVES)}")
    if "st-fp32" not in names:
        names.insert(0, "st-fp32")
    skipped = {n: _missing(n) for n in names if _missing(n)}
    names = [n for n in names if n not in skipped]
    rows: dict[str, list[dict]] = {n: [] for n in names}
    shutil.rmtree(KEPT_CACHE, ignore_errors=True)
    shutil.rmtree(KEPT_CACHE + "-native", ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(iter_docs(Path(args.corpus), args.n), tmp)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who runs first
            if args.baseline_rounds is not None and r >= args.baseline_rounds:
                order = [n for n in order if n != "st-fp32"]
            for name in order:
                out = subprocess.run([sys.executable, __file__, "--_child", name, "--_corpus", corpus],
                                     capture_output=True, text=True, env=_child_env(args))
                if out.returncode:
                    raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                rows[name].append(res)
                print(f"round {r + 1} {name:16s} {res['seconds']:8.1f} s  {args.n / res['seconds']:7.1f} passages/s",
                      flush=True)
    _print_speed(args, rows, skipped)


def _child_env(args) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.extra_path:
        env["PYTHONPATH"] = os.pathsep.join([args.extra_path, env.get("PYTHONPATH", "")])
    return env


def _per_round(rows, name: str, rounds: int) -> list[float]:
    """An alternative's seconds in each round; a round it did not run (the baseline after
    --baseline-rounds) takes the median of the rounds it ran."""
    secs = [r["seconds"] for r in rows[name]]
    return secs + [statistics.median(secs)] * (rounds - len(secs))


def _print_speed(args, rows, skipped) -> None:
    rounds = max(len(res) for res in rows.values())
    base = _per_round(rows, "st-fp32", rounds)
    # the fastest faithful alternative that is not densebeam, per round (st-fp32 included)
    others = [n for n in rows if not n.startswith("densebeam") and n not in UNFAITHFUL]
    best = [min(_per_round(rows, n, rounds)[r] for n in others) for r in range(rounds)]
    print(f"\n{args.n} passages from {args.corpus}, {rounds} round(s), {machine_line()}"
          + (f"; st-fp32 in the first {len(rows['st-fp32'])} round(s) only" if len(rows["st-fp32"]) < rounds else ""))
    print(f"{'alternative':18s} {'median s':>9s} {'range s':>15s} {'passages/s':>11s} {'vs st-fp32':>11s} "
          f"{'per-round ratios':>24s} {'vs fastest other':>17s} {'per round':>18s}")
    for name, res in rows.items():
        secs = [r["seconds"] for r in res]
        ratios = [b / s for b, s in zip(base, secs)]
        vs_best = [b / s for b, s in zip(best, secs)]
        med = statistics.median(secs)
        extra = f"  precision {res[0]['precision']}" if res[0].get("precision") else ""
        print(f"{name:18s} {med:9.1f} {min(secs):7.1f}-{max(secs):<7.1f} {args.n / med:11.1f} "
              f"{statistics.median(ratios):10.2f}x {' '.join(f'{x:.2f}' for x in ratios):>24s} "
              f"{statistics.median(vs_best):16.2f}x {' '.join(f'{x:.2f}' for x in vs_best):>18s}{extra}")
    print(f"(fastest other: per round, the fastest of {', '.join(others)}; not counted, fidelity below the "
          f"bar: {', '.join(sorted(UNFAITHFUL))})")
    for name, why in skipped.items():
        print(f"{name:18s} skipped: {why}")


# -- GPU ---------------------------------------------------------------------------------------
def gpu(args) -> None:
    """The encoder against plain sentence-transformers on one CUDA GPU, in one process (no Beam: a GPU
    machine may not have it), rounds interleaved; every alternative tokenizes with all cores."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from densebeam.index_store.encoding.encoder import load_encoder, resolve_model_path

    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    model = args.model if args.model != MODEL else resolve_model_path(MODEL)
    texts = [joined(d) for d in iter_docs(Path(args.corpus), args.n)]
    st32 = SentenceTransformer(model, device="cuda", model_kwargs={"dtype": torch.float32})
    st16 = SentenceTransformer(model, device="cuda", model_kwargs={"dtype": torch.float32}).half()
    auto = load_encoder(model, precision="auto", device="cuda")
    fp16 = load_encoder(model, precision="fp16", device="cuda")
    alts = {"st-fp32 (plain, batch 32)": lambda t: st32.encode(t, convert_to_numpy=True),
            "st-fp16 weights, batch 32": lambda t: st16.encode(t, convert_to_numpy=True),
            "st-fp16 weights, batch 256": lambda t: st16.encode(t, batch_size=256, convert_to_numpy=True),
            "densebeam auto": auto.encode, "densebeam fp16": fp16.encode}
    for fn in alts.values():
        fn(texts[:2000])  # warm-up (and auto's measurement)
    secs: dict[str, list[float]] = {k: [] for k in alts}
    for r in range(args.rounds):
        names = list(alts)[r % len(alts):] + list(alts)[:r % len(alts)]
        for name in names:
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = alts[name](texts)
            torch.cuda.synchronize()
            secs[name].append(time.perf_counter() - start)
            assert np.isfinite(np.asarray(out, dtype=np.float32)).all()
    base = secs["st-fp32 (plain, batch 32)"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.n} passages, {args.rounds} rounds; "
          f"densebeam auto chose {auto.precision} ({auto.calibration['candidates']}), token budget "
          f"{auto.token_budget}")
    for name, s in secs.items():
        ratios = [b / x for b, x in zip(base, s)]
        print(f"  {name:28s} median {statistics.median(s):7.2f} s ({min(s):.2f}-{max(s):.2f})  "
              f"{args.n / statistics.median(s):9.0f} passages/s  {statistics.median(ratios):6.2f}x")


# -- fidelity ------------------------------------------------------------------------------------
def fidelity(args) -> None:
    """Every alternative against st-fp32 on each collection: documents and queries both encoded by the
    alternative, exact inner-product search, NDCG@10 (graded qrels, ir_measures) and mean top-10
    overlap with fp32's results; the minimum cosine of document vectors to fp32's."""
    import numpy as np

    from densebeam.index_store.query.evaluate import evaluate, read_qrels, read_queries

    print(machine_line())
    names = args.alternatives.split(",") if args.alternatives else list(FIDELITY_MAKERS)
    if names[0] != "st-fp32":
        names = ["st-fp32"] + [n for n in names if n != "st-fp32"]
    skipped = {n: _missing(n) for n in names if _missing(n)}
    names = [n for n in names if n not in skipped]
    results = {}
    for coll in args.collections.split(","):
        base = SHARED / coll
        with open(base / "corpus.jsonl", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        ids, texts = [d["_id"] for d in docs], [joined(d) for d in docs]
        queries, qrels = read_queries(str(base / "queries.jsonl")), read_qrels(str(base / "qrels.tsv"))
        qids = [q for q in queries if q in qrels]  # judged queries only
        for name in names:
            encode = FIDELITY_MAKERS[name]()  # a fresh model per collection: auto measures on this corpus
            d_vec, q_vec = encode(texts), encode([queries[q] for q in qids])
            scores = q_vec @ d_vec.T
            top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
            run = {q: {ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(qids)}
            ndcg = evaluate(qrels, run, qids).metrics["ndcg@10"]
            results[(coll, name)] = (d_vec, top, ndcg)
            ref_vec, ref_top, ref_ndcg = results[(coll, "st-fp32")]
            overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top)]))
            cos = float(np.min(np.sum(d_vec * ref_vec, axis=1) / np.linalg.norm(d_vec, axis=1)
                               / np.linalg.norm(ref_vec, axis=1)))
            ok = overlap >= 0.98 and abs(ndcg - ref_ndcg) <= 0.005
            print(f"{coll:12s} {name:16s} NDCG@10 {ndcg:.4f} ({ndcg - ref_ndcg:+.4f})  top-10 overlap {overlap:.4f}  "
                  f"min cosine {cos:.5f}  {'faithful' if ok else 'NOT faithful'}  ({len(qids)} queries)", flush=True)
    for name, why in skipped.items():
        print(f"{name:16s} skipped: {why}")


# -- profile -------------------------------------------------------------------------------------
PROFILE_PARTS = (  # Beam-side parts, main thread, from cProfile: (label, file suffix)
    ("read + parse + validate", "index_store/corpus_io.py"),
    ("duplicate-id pass", "transforms/read.py"),
    ("journal (reuse cache) writes", "transforms/cache.py"),
    ("Parquet write + publish", "transforms/write.py"),
)


class _WallTimers:
    """Wall-clock seconds spent in the encoder's parts, installed on the class for one run (the forward
    pass runs in lane threads, which cProfile does not see)."""

    def __init__(self):
        from densebeam.index_store.encoding import encoder

        self.mod, self.secs, self.in_calibration = encoder, {}, False
        self.saved = [(encoder, "_load_encoder"), (encoder.Encoder, "calibrate"), (encoder.Encoder, "tokenize"),
                      (encoder.Encoder, "_encode_with")]
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in self.saved]
        for owner, name, fn in self.saved:
            setattr(owner, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def timed(*a, **kw):
            outer = name == "calibrate"
            if outer:
                self.in_calibration = True
            key = name + (" (measurement)" if self.in_calibration and not outer else "")
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.secs[key] = self.secs.get(key, 0.0) + time.perf_counter() - start
                if outer:
                    self.in_calibration = False
        return timed

    def restore(self):
        for owner, name, fn in self.saved:
            setattr(owner, name, fn)


def profile(args) -> None:
    """One ``densebeam encode`` run: wall seconds of each part. The encoder's parts are timed by
    wrappers; the Beam-side parts (main thread) by cProfile, which slows Python-heavy code (Beam's
    bookkeeping) more than the forward pass: read the parts as shares."""
    import cProfile
    import pstats

    t0 = time.perf_counter()
    from densebeam.pipelines import encode
    import_s = time.perf_counter() - t0
    timers = _WallTimers()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(iter_docs(Path(args.corpus), args.n), tmp)
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        encode.run(["--input", corpus, "--output", os.path.join(tmp, "out"), "--model", MODEL,
                    "--precision", args.precision, "--runner", "local", "--overwrite"])
        prof.disable()
        total = time.perf_counter() - start
    timers.restore()
    stats, t = pstats.Stats(prof).stats, timers.secs
    beam_run = _outermost_cumtime(stats, "apache_beam/pipeline.py", ("run",))
    encode_all = t.get("_encode_with", 0.0) + t.get("calibrate", 0.0)
    beam_parts = {label: _outermost_cumtime(stats, suffix, ()) for label, suffix in PROFILE_PARTS}
    rows = [
        ("start-up before Beam runs", total - beam_run),
        ("  of which model load (files or sentence-transformers)", t.get("_load_encoder", 0.0)),
        ("auto precision measurement (64 passages; 0 when remembered)", t.get("calibrate", 0.0)),
        ("tokenization (cut + tokenize once)", t.get("tokenize", 0.0)),
        ("forward pass (lanes) + normalize", t.get("_encode_with", 0.0) - t.get("tokenize", 0.0)),
        *beam_parts.items(),
        ("Beam itself (scheduling, coders, shuffles, bundles)", beam_run - encode_all - sum(beam_parts.values())),
    ]
    print(f"{args.n} passages, precision {args.precision}: import of the pipeline module {import_s:.1f} s "
          f"(not counted), encode.run {total:.1f} s ({args.n / total:.1f} passages/s; Beam parts under cProfile)")
    for label, secs in rows:
        print(f"  {label:58s} {secs:7.1f} s  {100 * secs / total:5.1f}%")


def _outermost_cumtime(stats, suffix: str, funcs) -> float:
    """Cumulative time of the functions of a file (or the named ones) not called by another of them."""
    chosen = {k for k in stats if k[0].endswith(suffix) and (not funcs or k[2] in funcs)}
    total = 0.0
    for key in chosen:
        _, _, _, cumtime, callers = stats[key]
        inner = sum(v[3] for c, v in callers.items() if c in chosen)
        total += max(cumtime - inner, 0.0) if inner else cumtime
    return total


# -- memory --------------------------------------------------------------------------------------
def pipeline_encode(corpus: str, out: str, precision: str, model: str = MODEL) -> float:
    from densebeam.pipelines import encode

    start = time.perf_counter()
    encode.run(["--input", corpus, "--output", out, "--model", model, "--precision", precision,
                "--runner", "local", "--overwrite"])
    return time.perf_counter() - start


def _child_peak_rss(corpus: str, model: str) -> None:
    """Only the pipeline runs in this process: the corpus was written by the parent, so the peak is
    the pipeline's own (an earlier version built the passages in the child and counted them too)."""
    with tempfile.TemporaryDirectory() as tmp:
        secs = pipeline_encode(corpus, os.path.join(tmp, "out"), "auto", model)
    print(json.dumps({"seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# -- attention -----------------------------------------------------------------------------------
def attention(args) -> None:
    """The packed forward (``--precision fp32`` or ``bf16``; default: bf16 where the CPU has bf16
    arithmetic, else fp32) with PyTorch's attention and residual connections against the native kernels
    (the defaults), on the real batches of ``--n`` passages (one lane: one thread, as each lane runs): the
    attention of one layer alone, and the whole forward pass; repeats interleaved, median and range."""
    import numpy as np
    import torch

    from densebeam.index_store.encoding import cpu
    from densebeam.index_store.encoding import native
    from densebeam.index_store.encoding.encoder import load_encoder
    from densebeam.index_store.encoding.packed_bert import _length_groups

    torch.set_num_threads(1)
    mode = args.precision if args.precision in ("fp32", "bf16") else ("bf16" if cpu.native_bf16() else "fp32")
    kind = "fp32" if mode == "fp32" else "bf16"
    if native.kernels(kind) is None:
        raise SystemExit(f"the native {kind} kernels cannot run here: {native.why_not(kind)}")
    print(machine_line())
    texts = [joined(d) for d in iter_docs(Path(args.corpus), args.n)]
    enc = load_encoder(MODEL, precision=mode, device="cpu")
    ids, _ = enc.tokenize(texts)
    lengths = np.array([len(x) for x in ids])
    batches = enc.plan_batches(lengths, True)
    runners = {"pytorch": enc._make_runner(mode), "native": enc._make_runner(mode)}
    runners["pytorch"].bert.attention = "groups"
    runners["pytorch"].bert.fused_layernorm = False
    assert runners["native"].bert.attention == "native"
    bert = runners["native"].bert
    hidden, heads = bert.hidden, bert.heads
    layer_inputs = []  # (qkv, groups) of a layer of every batch (random values: the time does not depend on them)
    for idx in batches:
        lens = lengths[idx]  # longest first, as plan_batches orders them
        groups = _length_groups(lens)
        qkv = (torch.randn(int(lens.sum()), 3 * hidden) * 0.5).to(bert.mm_dtype)
        layer_inputs.append((qkv, groups))

    def attend_all(kind):
        for qkv, groups in layer_inputs:
            if kind == "native":
                bert._attend_native(qkv, groups)
            else:
                bert._attend_groups(qkv, groups)

    def forward_all(kind):
        for idx in batches:
            runners[kind]([ids[j] for j in idx], [])

    secs = {(part, kind): [] for part in ("attention", "forward") for kind in runners}
    with torch.inference_mode():
        attend_all("pytorch"), attend_all("native"), forward_all("pytorch"), forward_all("native")  # warm-up
        for _ in range(args.rounds):
            for part, fn in (("attention", attend_all), ("forward", forward_all)):
                for kind in runners:
                    start = time.perf_counter()
                    fn(kind)
                    secs[(part, kind)].append(time.perf_counter() - start)
    tokens = int(lengths.sum())
    print(f"{args.n} passages ({tokens} tokens, {len(batches)} batches), {mode}, one thread, {args.rounds} "
          f"rounds; {heads} heads of {hidden // heads}; native: {bert._native.name}")
    for part in ("attention", "forward"):
        med = {k: statistics.median(secs[(part, k)]) for k in runners}
        for kind in runners:
            s = secs[(part, kind)]
            unit = (f"{tokens / med[kind]:9.0f} tokens/s per layer" if part == "attention" else
                    f"{args.n / med[kind]:9.1f} passages/s")
            print(f"  {part:9s} {kind:8s} {unit}  (median {med[kind]:.3f} s, range {min(s):.3f}-{max(s):.3f})")
        print(f"  {part:9s} native / pytorch speed: {med['pytorch'] / med['native']:.2f}x")


def products(args) -> None:
    """The matrix products of one layer of the model, at the rows of one forward pass (the default token
    budget), one thread: float32 as the fp32 forward runs them (oneDNN, weights pre-packed) against the
    int16 precision's native products (rounding the inputs included; the feed-forward's first product
    with its GELU in both); repeats interleaved, median and range."""
    import torch

    from densebeam.index_store.encoding import native
    from densebeam.index_store.encoding.encoder import DEFAULT_TOKEN_BUDGET, load_encoder

    torch.set_num_threads(1)
    if native.kernels("int16") is None:
        raise SystemExit(f"the native int16 kernels cannot run here: {native.why_not('int16')}")
    print(machine_line())
    enc = load_encoder(MODEL, precision="fp32", device="cpu")
    fp32, int16 = enc._make_runner("fp32").bert, enc._make_runner("int16").bert
    rows = DEFAULT_TOKEN_BUDGET
    gen = torch.Generator().manual_seed(0)
    names = ("q, k, v", "attention output", "feed-forward 1 + GELU", "feed-forward 2")
    layer32, layer16 = fp32.layers[0], int16.layers[0]
    shapes = []
    for name, i in zip(names, (0, 1, 3, 4)):
        k = layer16[i].k
        shapes.append((name, i, torch.randn(rows, k, generator=gen), layer16[i].n))
    secs = {(name, kind): [] for name, *_ in shapes for kind in ("fp32", "int16")}

    def run(kind, i, x):
        act = "gelu" if i == 3 else "none"
        return (fp32._mm(x, layer32[i], act) if kind == "fp32" else int16._mm(x, layer16[i], act))

    with torch.inference_mode():
        for _ in range(args.rounds + 1):  # the first is a warm-up
            for name, i, x, _ in shapes:
                for kind in ("fp32", "int16"):
                    start = time.perf_counter()
                    for _ in range(10):
                        run(kind, i, x)
                    secs[(name, kind)].append((time.perf_counter() - start) / 10)
    print(f"{rows} rows, one thread, {args.rounds} rounds of 10 calls; int16: {int16._int16.name}, "
          f"fp32: {'oneDNN' if fp32._pack else 'torch.nn.functional.linear'}")
    for name, i, x, n in shapes:
        flops = 2.0 * rows * x.shape[1] * n
        med = {kind: statistics.median(secs[(name, kind)][1:]) for kind in ("fp32", "int16")}
        line = "  ".join(f"{kind} {flops / med[kind] / 1e9:6.1f} GFLOP/s ({min(secs[(name, kind)][1:]) * 1e3:.2f}-"
                         f"{max(secs[(name, kind)][1:]) * 1e3:.2f} ms)" for kind in ("fp32", "int16"))
        print(f"  {name:22s} {x.shape[1]:5d} -> {n:5d}  {line}  int16 / fp32 speed: "
              f"{med['fp32'] / med['int16']:.2f}x")


def memory(args) -> None:
    model = args.model
    if model == "tiny":  # the tests' 2-layer model: isolates the pipeline's memory from the model's
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_bi_encoder

        model = str(build_tiny_bi_encoder(Path(_scratch_dir("densebeam-tiny-")), normalize=True))
    rows = []
    for n in [int(x) for x in args.memory.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_corpus(iter_docs(Path(args.corpus), n), tmp)
            out = subprocess.run([sys.executable, __file__, "--_rss", corpus, "--model", model],
                                 check=True, capture_output=True, text=True).stdout
        rows.append({"n": n, **json.loads(out.strip().splitlines()[-1])})
    base = rows[0]["peak_rss_mb"]
    print(f"{'passages':>9s} {'seconds':>8s} {'peak RSS MB':>12s} {'vs first':>9s}")
    for r in rows:
        print(f"{r['n']:9d} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / base:8.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3, help="speed: interleaved rounds of every alternative")
    p.add_argument("--baseline-rounds", type=int,
                   help="speed: run st-fp32 (the baseline, ~15 min at 50,000 passages here) in the first N rounds "
                        "only (default: every round); later rounds' ratios to it use its median")
    p.add_argument("--alternatives", help=f"comma-separated, from {list(ALTERNATIVES)} (speed) or "
                                          f"{list(FIDELITY_MAKERS)} (fidelity)")
    p.add_argument("--extra-path", help="a folder with optional runtimes (onnxruntime, openvino) for the children")
    p.add_argument("--cpu-family", choices=("avx512-bf16", "avx512", "avx2"),
                   help="run everything as this CPU family (index_store.encoding.cpu.limit_env: PyTorch, oneDNN, MKL and "
                        "densebeam capped; simulated on a CPU that has more; ONNX Runtime cannot be capped)")
    p.add_argument("--fidelity", action="store_true", help="fidelity to fp32 on the shared collections")
    p.add_argument("--collections", default=",".join(COLLECTIONS))
    p.add_argument("--profile", action="store_true", help="where the time of one densebeam encode goes")
    p.add_argument("--gpu", action="store_true", help="encoder vs plain sentence-transformers on a CUDA GPU")
    p.add_argument("--attention", action="store_true",
                   help="the packed bf16 forward: PyTorch's operations vs the native kernels")
    p.add_argument("--products", action="store_true",
                   help="one layer's matrix products: float32 (oneDNN) against the int16 native ones")
    p.add_argument("--precision", default="auto", help="--profile: the precision to profile")
    p.add_argument("--memory", help="comma-separated passage counts for the peak-memory comparison")
    p.add_argument("--model", default=MODEL,
                   help="model for --memory; 'tiny' builds the tests' 2-layer model (pipeline memory only)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_corpus", help=argparse.SUPPRESS)
    p.add_argument("--_rss", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cpu_family:  # before torch is imported here, and inherited by every child
        from densebeam.index_store.encoding import cpu

        if not cpu.can_limit_to(args.cpu_family):
            raise SystemExit(f"this CPU ({cpu.family()}) cannot run as {args.cpu_family}")
        os.environ.update(cpu.limit_env(args.cpu_family))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.extra_path:
        sys.path.insert(0, args.extra_path)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args._child:
        print(json.dumps(_child_run(args._child, args._corpus)))
    elif args._rss:
        _child_peak_rss(args._rss, args.model)
    elif args.memory:
        memory(args)
    elif args.fidelity:
        fidelity(args)
    elif args.profile:
        profile(args)
    elif args.gpu:
        gpu(args)
    elif args.attention:
        attention(args)
    elif args.products:
        products(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
