"""``--precision auto`` on the local runner is decided once, at launch: every worker (threads of one
process) encodes in the one precision chosen and the manifest records how it was chosen and what it
cost. On a CPU with bf16 arithmetic it is measured on a deterministic sample of the corpus the first time
a model runs on the machine, and remembered: a re-run, the same corpus grown, or another corpus adopts
the choice instead of timing again (timed choices between close precisions would not always agree, and a
re-run after a crash must encode like the first run). On an x86-64 CPU without, int16 is measured against
fp32 the same way (tests/test_native_int16.py); where the native kernels cannot run either, it is fp32 and
nothing is timed."""

from __future__ import annotations

import json

import pytest

from densebeam.index_store.encoding import encoder as encoder_mod
from densebeam.index_store.encoding import native
from densebeam.pipelines import encode
from conftest import make_passages, write_jsonl


@pytest.fixture()
def memo_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("DENSEBEAM_CACHE_DIR", str(d))
    encoder_mod._LOADED.clear()  # a fresh process: no encoder resolved by an earlier test
    yield d / "precision"
    encoder_mod._LOADED.clear()


def _encode(corpus, out, model, *extra):
    return encode.run(["--input", str(corpus), "--output", str(out), "--model", model, "--runner", "local",
                       "--batch-size", "64", *extra])


def _candidates() -> list:
    """What auto measures here for the tiny models (packed; head size 16: no native bf16 kernels)."""
    return encoder_mod.candidate_precisions("cpu", int16=native.planned("int16") != "torch")


def _needs_candidates():
    if not _candidates():
        pytest.skip("this CPU has no bf16 arithmetic and no native int16 products: auto measures nothing here "
                    "(test_without_bf16_arithmetic_auto_is_fp32_and_times_nothing covers it)")


def test_auto_is_decided_once_at_launch_for_every_worker_and_recorded(tmp_path, tiny_cos_model, memo_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(400, seed=11))
    m = _encode(corpus, tmp_path / "out", tiny_cos_model, "--workers", "2")
    rec = m["precision_measurement"]
    assert "reused" not in rec and rec["seconds"] >= 0
    if _candidates():
        assert rec["measured"] is True and rec["sample_passages"] == encoder_mod.CALIBRATION_PASSAGES
        assert set(rec["candidates"]) == {"fp32", *_candidates()}
        assert rec["candidates"]["fp32"]["min_cosine"] == 1.0 and rec["candidates"][rec["chosen"]]["faithful"]
        assert len(list(memo_dir.glob("*.json"))) == 1
    else:
        assert rec["measured"] is False and rec["chosen"] == "fp32" and "candidates" not in rec
    # Both workers encoded in the one precision chosen at launch; the user's request stays "auto".
    assert m["model_facts"]["precision"] == rec["chosen"] and "+" not in rec["chosen"]
    assert m["encode_identity"]["precision"] == rec["chosen"]
    assert m["options"]["encode"]["precision"] == "auto"


def test_a_rerun_a_grown_corpus_and_another_corpus_adopt_the_remembered_choice(tmp_path, tiny_cos_model,
                                                                                 tiny_dot_model, memo_dir):
    _needs_candidates()
    passages = make_passages(300, seed=12)
    corpus = write_jsonl(tmp_path / "c.jsonl", passages)
    first = _encode(corpus, tmp_path / "a", tiny_cos_model)["precision_measurement"]
    assert first["measured"] is True
    (memo,) = memo_dir.glob("*.json")
    # Make the remembered choice one the timing would not make (fp32 is always faithful): later runs
    # must follow the memo, not measure again.
    other = "fp32" if first["chosen"] != "fp32" else _candidates()[0]
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "chosen": other}))
    grown = write_jsonl(tmp_path / "grown.jsonl", make_passages(1, seed=99, prefix="new") + passages)
    another = write_jsonl(tmp_path / "d.jsonl", make_passages(300, seed=13))
    for i, c in enumerate((corpus, grown, another)):  # a re-run; one passage added at the head; another corpus
        encoder_mod._LOADED.clear()  # as a new process would
        again = _encode(c, tmp_path / f"b{i}", tiny_cos_model)
        assert again["precision_measurement"]["chosen"] == other and "reused" in again["precision_measurement"]
        assert again["model_facts"]["precision"] == other
    # Another model is measured, and remembered beside the first.
    encoder_mod._LOADED.clear()
    third = _encode(corpus, tmp_path / "c", tiny_dot_model)["precision_measurement"]
    assert third["measured"] is True and "reused" not in third
    assert len(list(memo_dir.glob("*.json"))) == 2
    # An unreadable memo is measured again, never fatal.
    for f in memo_dir.glob("*.json"):
        f.write_text("{not json")
    encoder_mod._LOADED.clear()
    fourth = _encode(corpus, tmp_path / "e", tiny_cos_model)["precision_measurement"]
    assert fourth["measured"] is True and "reused" not in fourth


def test_without_bf16_arithmetic_auto_is_fp32_and_times_nothing(tmp_path, tiny_cos_model, memo_dir, monkeypatch):
    """An AVX2 CPU (simulated where this one has more) without the native kernels (turned off): fp32 by
    rule, no precision timed, nothing to remember; an explicit bf16 is refused before any work, naming the
    way out."""
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", "avx2")
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")
    assert _candidates() == []
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(200, seed=15))
    m = _encode(corpus, tmp_path / "out", tiny_cos_model)
    rec = m["precision_measurement"]
    assert rec["measured"] is False and rec["chosen"] == "fp32" == m["model_facts"]["precision"]
    assert "candidates" not in rec and "bf16 arithmetic" in rec["reason"]
    assert not memo_dir.exists()
    for precision in ("bf16", "bf16-mixed"):
        with pytest.raises(ValueError, match=f"--precision {precision} needs bf16 arithmetic.*auto"):
            _encode(corpus, tmp_path / precision, tiny_cos_model, "--precision", precision)


def test_an_explicit_precision_is_not_measured(tmp_path, tiny_cos_model, memo_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(100, seed=14))
    m = _encode(corpus, tmp_path / "out", tiny_cos_model, "--precision", "fp32")
    assert m["precision_measurement"] == {"measured": False, "chosen": "fp32", "reason": "--precision given"}
    assert not memo_dir.exists()
