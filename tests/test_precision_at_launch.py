"""``--precision auto`` on the local runner is measured once, at launch, on a deterministic sample of the
corpus: every worker (threads of one process) encodes in the one precision chosen, the manifest records
the measurement, and a re-run on the same machine with the same model and corpus sample adopts the
remembered choice instead of timing again (timed choices between close precisions would not always
agree, and a re-run after a crash must encode like the first run)."""

from __future__ import annotations

import json

import pytest

from densebeam.index_store import encoder as encoder_mod
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


def test_auto_is_measured_once_at_launch_for_every_worker_and_recorded(tmp_path, tiny_cos_model, memo_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(400, seed=11))
    m = _encode(corpus, tmp_path / "out", tiny_cos_model, "--workers", "2")
    rec = m["precision_measurement"]
    assert rec["measured"] is True and "reused" not in rec
    assert rec["sample_passages"] == encoder_mod.CALIBRATION_PASSAGES
    assert set(rec["candidates"]) == {"fp32", *encoder_mod.candidate_precisions("cpu")}
    assert rec["candidates"]["fp32"]["min_cosine"] == 1.0 and rec["candidates"][rec["chosen"]]["faithful"]
    # Both workers encoded in the one precision chosen at launch; the user's request stays "auto".
    assert m["model_facts"]["precision"] == rec["chosen"] and "+" not in rec["chosen"]
    assert m["encode_identity"]["precision"] == rec["chosen"]
    assert m["options"]["encode"]["precision"] == "auto"
    assert len(list(memo_dir.glob("*.json"))) == 1


def test_a_rerun_adopts_the_remembered_choice_and_another_corpus_is_measured(tmp_path, tiny_cos_model,
                                                                                memo_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(300, seed=12))
    first = _encode(corpus, tmp_path / "a", tiny_cos_model)["precision_measurement"]
    (memo,) = memo_dir.glob("*.json")
    # Make the remembered choice one the timing would not make (fp32 is always faithful): the re-run
    # must follow the memo, not measure again.
    other = "fp32" if first["chosen"] != "fp32" else encoder_mod.candidate_precisions("cpu")[0]
    memo.write_text(json.dumps({**json.loads(memo.read_text()), "chosen": other}))
    encoder_mod._LOADED.clear()  # as a new process would
    again = _encode(corpus, tmp_path / "b", tiny_cos_model)
    assert again["precision_measurement"]["chosen"] == other and "reused" in again["precision_measurement"]
    assert again["model_facts"]["precision"] == other
    # A corpus that starts differently is another sample: measured afresh, remembered separately.
    encoder_mod._LOADED.clear()
    corpus2 = write_jsonl(tmp_path / "d.jsonl", make_passages(300, seed=13))
    third = _encode(corpus2, tmp_path / "c", tiny_cos_model)["precision_measurement"]
    assert third["measured"] is True and "reused" not in third
    assert len(list(memo_dir.glob("*.json"))) == 2
    # An unreadable memo is measured again, never fatal.
    for f in memo_dir.glob("*.json"):
        f.write_text("{not json")
    encoder_mod._LOADED.clear()
    fourth = _encode(corpus, tmp_path / "e", tiny_cos_model)["precision_measurement"]
    assert fourth["measured"] is True and "reused" not in fourth


def test_an_explicit_precision_is_not_measured(tmp_path, tiny_cos_model, memo_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(100, seed=14))
    m = _encode(corpus, tmp_path / "out", tiny_cos_model, "--precision", "fp32")
    assert m["precision_measurement"] == {"measured": False, "chosen": "fp32", "reason": "--precision given"}
    assert not memo_dir.exists()
