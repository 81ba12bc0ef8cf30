"""Signed bundles: an HMAC-SHA256 of the manifest, which lists every file's size and sha256. No Beam.

``densebeam index|build --sign-key FILE`` writes ``manifest.sig`` beside the manifest once the pipeline
has published it (the key never travels into the pipeline, to a Dataflow or Flink worker; a versioned
location switches to the new version only once it is signed). A reader given the key (``--trust-key FILE``: search, eval,
serve and its reload proof, ``inspect --verify``) then opens a bundle only when the signature matches the
manifest's exact bytes, every file matches its hash (a full read, whatever ``--verify`` says), and the
bundle holds no file the manifest does not list. Without a key, bundles open as before (their manifest
and hashes protect against damage, not against someone who can rewrite them); docs/reliability.md says
what each mode protects against.

The key is a file of at least 32 bytes (e.g. ``head -c 32 /dev/urandom > bundle.key``), shared by the
builder and the readers and kept from anyone who may write the bundle store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Iterable, Optional

SIGNATURE = "manifest.sig"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_BYTES = 32


class SignatureError(ValueError):
    """A bundle that is unsigned, signed with another key, or whose manifest or files changed."""


def read_key(path: Optional[str]) -> Optional[bytes]:
    """The key in file ``path`` (None when no path): at least :data:`MIN_KEY_BYTES` bytes."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            key = f.read()
    except OSError as err:
        raise ValueError(f"cannot read the key file {path}: {err}") from err
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the key file {path} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                         "(make one with: head -c 32 /dev/urandom > bundle.key)")
    return key


def key_id(key: bytes) -> str:
    """A short name of a key (not the key): which key signed, for error messages."""
    return hashlib.sha256(b"densebeam-key-id:" + key).hexdigest()[:16]


def signature(manifest_bytes: bytes, key: bytes) -> bytes:
    """The ``manifest.sig`` contents for ``manifest_bytes``."""
    mac = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    return (json.dumps({"algorithm": ALGORITHM, "key_id": key_id(key), "mac": mac}, sort_keys=True) + "\n").encode()


def check(manifest_bytes: bytes, sig_bytes: Optional[bytes], key: bytes, where: str) -> None:
    """Raise :class:`SignatureError` unless ``sig_bytes`` signs ``manifest_bytes`` with ``key``."""
    if sig_bytes is None:
        raise SignatureError(f"{where} has no {SIGNATURE}: an unsigned bundle is refused under --trust-key. "
                             "Build it with --sign-key, or open it without --trust-key if you trust its store")
    try:
        sig = json.loads(sig_bytes)
        mac, algorithm, kid = sig["mac"], sig["algorithm"], sig["key_id"]
    except (ValueError, KeyError, TypeError) as err:
        raise SignatureError(f"{where}'s {SIGNATURE} is damaged ({err}); refusing the bundle") from err
    if algorithm != ALGORITHM or not isinstance(mac, str):
        raise SignatureError(f"{where}'s {SIGNATURE} uses {algorithm!r}; densebeam checks {ALGORITHM}")
    want = hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        other = "" if kid == key_id(key) else f" (it was signed with key {kid}, this key is {key_id(key)})"
        raise SignatureError(f"{where}: the manifest does not match its signature{other}: it was changed after "
                             "signing, or signed with another key. Refusing the bundle")


def check_no_extra_files(local_root: str, listed: Iterable[str], where: str) -> None:
    """Under a trust key a bundle holds exactly what its manifest lists (plus the manifest and its
    signature): an added file is refused, naming it."""
    allowed = set(listed) | {"manifest.json", SIGNATURE}
    for dirpath, _, names in os.walk(local_root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), local_root).replace(os.sep, "/")
            if rel not in allowed:
                raise SignatureError(f"{where} holds {rel}, a file its signed manifest does not list; refusing "
                                     "the bundle (remove the file, or rebuild and sign the bundle again)")


def sign_bundle(root: str, key: bytes) -> None:
    """Write ``root``'s ``manifest.sig`` for its manifest as it is now."""
    from densebeam.index_store import fsutil
    from densebeam.index_store.artifacts.bundle_manifest import read_manifest_bytes
    from densebeam.index_store.artifacts.embeddings import join

    raw = read_manifest_bytes(root)
    with fsutil.atomic_local_output(join(root, SIGNATURE)) as tmp:
        with open(tmp, "wb") as f:
            f.write(signature(raw, key))
