"""Bundles a service can trust: the manifest validated by schema (a malformed field is refused at open,
``inspect --verify`` and the reload proof, naming it), and signed bundles (``index --sign-key``) that a
reader given the key (``--trust-key``) refuses after any change: the attack's families (manifest edits,
re-hashed and plain bit flips in every file, added and removed files, another key, no signature) are
replayed against a signed bundle and none is accepted. Unsigned bundles keep opening without a key."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import pytest

from densebeam.index_store.artifacts import signing
from densebeam.index_store.artifacts.bundle import BundleError, open_bundle
from densebeam.index_store.query import reload as reload_lib
from densebeam.index_store.types import ModelFacts
from densebeam.pipelines import build_index, cli
from test_build_index import clustered, write_embeddings_dir

DIM, N, NLIST = 32, 900, 8
FACTS = ModelFacts(model="synthetic", revision=None, dim=DIM, similarity="cos", dtype="float32")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signed")
    key = tmp / "bundle.key"
    key.write_bytes(bytes(range(48)))
    emb = write_embeddings_dir(tmp / "emb", clustered(N, seed=7, dim=DIM), FACTS, shard_rows=400)
    for name, extra in (("signed", ["--sign-key", str(key)]), ("unsigned", [])):
        build_index.run(["--embeddings", emb, "--output", str(tmp / name), "--nlist", str(NLIST),
                         "--recall-queries", "40", "--runner", "local", *extra])
    return tmp, key.read_bytes(), key


def _copy(tmp, src, name):
    dst = tmp / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _rehash(bundle, path):
    """Recompute ``path``'s size and sha256 in the manifest, as an attacker who can write the store would."""
    m = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / path).read_bytes()
    for e in m["files"]:
        if e["path"] == path:
            e["size"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _accepted(bundle, key) -> bool:
    try:
        open_bundle(str(bundle), verify="none", trust_key=key)  # the key forces a full check regardless
    except (BundleError, ValueError):
        return False
    return True


def test_signed_and_unsigned_bundles_open(built):
    tmp, key, _ = built
    assert (tmp / "signed" / signing.SIGNATURE).exists() and not (tmp / "unsigned" / signing.SIGNATURE).exists()
    assert open_bundle(str(tmp / "signed"), trust_key=key).searcher.ntotal == N
    assert open_bundle(str(tmp / "signed")).searcher.ntotal == N  # no key asked for: opens as before
    assert open_bundle(str(tmp / "unsigned")).searcher.ntotal == N
    with pytest.raises(signing.SignatureError, match="unsigned bundle is refused"):
        open_bundle(str(tmp / "unsigned"), trust_key=key)


def test_no_tampered_signed_bundle_is_accepted(built):
    tmp, key, _ = built
    src = tmp / "signed"
    files = [e["path"] for e in json.loads((src / "manifest.json").read_text())["files"]]
    rng = random.Random(5)
    attacks = []
    edits = {"model_facts.similarity": ("model_facts", "similarity", "dot"),
             "model_facts.max_seq_length": ("model_facts", "max_seq_length", 1),
             "nprobe": (None, "nprobe", 1), "nprobe_by_k": (None, "nprobe_by_k", {"10": {"nprobe": 1, "recall": 1.0}})}
    for name, (outer, field, value) in edits.items():
        b = _copy(tmp, src, "t")
        m = json.loads((b / "manifest.json").read_text())
        if field == "nprobe":  # another valid value than the build's
            value = m["nprobe"] % NLIST + 1
        (m[outer] if outer else m)[field] = value
        (b / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        assert (b / "manifest.json").read_bytes() != (src / "manifest.json").read_bytes()
        attacks.append((f"edit {name}", _accepted(b, key)))
    for path in files:
        size = (src / path).stat().st_size
        for pos in sorted({0, size // 2, size - 1, rng.randrange(size)}):
            for rehash in (False, True):
                b = _copy(tmp, src, "t")
                data = bytearray((b / path).read_bytes())
                data[pos] ^= 1 << rng.randrange(8)
                (b / path).write_bytes(bytes(data))
                if rehash:
                    _rehash(b, path)
                attacks.append((f"flip {path}@{pos}{' re-hashed' if rehash else ''}", _accepted(b, key)))
    b = _copy(tmp, src, "t")
    (b / "docstore" / "extra.arrow").write_bytes(b"not listed")
    attacks.append(("added file", _accepted(b, key)))
    b = _copy(tmp, src, "t")
    (b / files[-1]).unlink()
    attacks.append(("removed file", _accepted(b, key)))
    b = _copy(tmp, src, "t")
    (b / signing.SIGNATURE).unlink()
    attacks.append(("signature removed", _accepted(b, key)))
    b = _copy(tmp, src, "t")
    signing.sign_bundle(str(b), b"another key that is at least 32 bytes long")
    attacks.append(("signed with another key", _accepted(b, key)))
    assert len(attacks) > 30
    assert [name for name, ok in attacks if ok] == []  # 0 accepted


def test_the_cli_and_the_reload_proof_take_the_key(built, capsys):
    tmp, key, key_file = built
    b = _copy(tmp, tmp / "signed", "cli")
    assert cli.main(["inspect", str(b), "--verify", "--trust-key", str(key_file)]) == 0
    assert "signed with the trusted key" in capsys.readouterr().out
    assert reload_lib.prove(str(b), trust_key_file=str(key_file))["vectors"] == N
    m = json.loads((b / "manifest.json").read_text())
    m["model_facts"]["similarity"] = "dot"
    (b / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    assert cli.main(["inspect", str(b), "--verify", "--trust-key", str(key_file)]) == 2
    assert "does not match its signature" in capsys.readouterr().err
    with pytest.raises(reload_lib.ReloadError, match="does not match its signature"):
        reload_lib.prove(str(b), trust_key_file=str(key_file))
    short = tmp / "short.key"
    short.write_bytes(b"too short")
    assert cli.main(["inspect", str(b), "--verify", "--trust-key", str(short)]) == 2
    assert "at least 32" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [
    ("nprobe_by_k", {"10": "x"}), ("nprobe_by_k", {"10": {"nprobe": 10 ** 9, "recall": 0.9}}),
    ("recall_curve", [{"nprobe": 1, "recall": "high"}]), ("nprobe", 0), ("target_recall", 2),
    ("model_facts", {"model": "m", "dim": DIM, "similarity": "cosine", "dtype": "float32"}),
    ("model_facts", {"model": "m", "dim": DIM, "similarity": "cos", "dtype": "float32", "max_seq_length": -1}),
    ("counts", {"vectors": "many", "shards": 1}),
])
def test_a_malformed_manifest_field_is_refused_everywhere_naming_it(built, capsys, field, value):
    tmp, _, _ = built
    b = _copy(tmp, tmp / "unsigned", "schema")
    m = json.loads((b / "manifest.json").read_text())
    m[field] = value
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"malformed field\\(s\\) {field}"):
        open_bundle(str(b))
    assert cli.main(["inspect", str(b), "--verify"]) == 2
    assert field in capsys.readouterr().err
    with pytest.raises(reload_lib.ReloadError, match=field):
        reload_lib.prove(str(b))
