"""The packed forward's attention as native code (``attention_avx512.c``), built on first use. No Beam import.

PyTorch runs a packed layer's attention as a few small operations per group of equal-length passages
(score products, a float32 softmax, conversions, copies): 22% of the bf16 forward pass of
all-MiniLM-L6-v2 on a 2-core AVX-512 CPU, though its arithmetic is under 1% of the layer's. The C
kernel does all of it in one call per layer, keeps the scores in float32 and runs 2.0-2.5x faster than
the PyTorch path on the same batch (``bench/encode_bench.py --attention``).

It is compiled once per machine with the C compiler found (``$CC``, else ``cc``, ``gcc`` or ``clang``)
into ``$DENSEBEAM_CACHE_DIR/native`` (default ``~/.cache/densebeam/native``), named by a hash of the
source, the flags and the compiler's version; the file is written under a temporary name and renamed, so
concurrent workers never load half a library. The compiled kernel is checked against a float64
reference before its first use. It is used only where it can run: an x86-64 CPU with AVX-512 F, BW and
BF16, bf16 matrix products, a head size that is a multiple of 32. Anywhere else (another CPU, no
compiler, a failed build or check, ``DENSEBEAM_NATIVE=0``) the PyTorch attention runs, and the log
says why once per process. Which one ran is recorded in the ``auto`` precision measurement.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_avx512.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma", "-ffp-contract=off", "-fPIC", "-shared")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
NAME = "avx512-bf16"  # what the measurement record calls this kernel

_LOCK = threading.Lock()
_KERNEL: Optional["AttentionKernel"] = None
_WHY_NOT: Optional[str] = None  # why the kernel is not available, once known
_TRIED = False


class AttentionKernel:
    """``attend(qkv, ctx, groups, heads, head_dim)``: ``qkv`` (rows, 3 * heads * head_dim) and ``ctx``
    (rows, heads * head_dim) contiguous bf16 CPU tensors, ``groups`` (first row, passages, length)
    triples. Thread-safe (ctypes releases the GIL for the call; the kernel keeps no state)."""

    name = NAME

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self._attend = lib.densebeam_attend_bf16
        self._attend.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int64]
        self._attend.restype = ctypes.c_int
        self._transpose = lib.densebeam_transpose16
        self._transpose.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._transpose.restype = None

    def attend(self, qkv, ctx, groups, heads: int, head_dim: int) -> None:
        import torch

        if qkv.dtype != torch.bfloat16 or ctx.dtype != torch.bfloat16:
            raise TypeError("the native attention takes bf16 tensors")
        if not (qkv.is_contiguous() and ctx.is_contiguous()) or qkv.device.type != "cpu":
            raise ValueError("the native attention takes contiguous CPU tensors")
        g = np.ascontiguousarray(np.asarray(groups, dtype=np.int64).reshape(-1, 3))
        if len(g):
            last = int(g[-1, 0] + g[-1, 1] * g[-1, 2])
            if last > qkv.shape[0] or last > ctx.shape[0] or qkv.shape[1] != 3 * heads * head_dim \
                    or ctx.shape[1] != heads * head_dim:
                raise ValueError(f"groups reach row {last}; qkv {tuple(qkv.shape)}, ctx {tuple(ctx.shape)}")
        rc = self._attend(qkv.data_ptr(), ctx.data_ptr(), g.ctypes.data, len(g), heads, head_dim)
        if rc:
            raise RuntimeError(f"native attention failed ({'out of memory' if rc == -1 else f'code {rc}'})")

    def transpose16(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.int32).reshape(16, 16)
        out = np.empty_like(a)
        self._transpose(a.ctypes.data, out.ctypes.data)
        return out


def attention_kernel() -> Optional[AttentionKernel]:
    """The native attention kernel, built and checked on the first call of the process; None where it
    cannot run (:func:`why_not` says why)."""
    global _KERNEL, _WHY_NOT, _TRIED
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            try:
                _KERNEL = _load()
            except _Unavailable as err:
                _WHY_NOT = str(err)
                log.info("native attention not used: %s; PyTorch's attention runs instead", err)
            except Exception as err:  # noqa: BLE001 - an optional fast path: any failure falls back
                _WHY_NOT = f"{type(err).__name__}: {err}"
                log.warning("native attention not used (%s); PyTorch's attention runs instead", _WHY_NOT)
        return _KERNEL


def why_not() -> Optional[str]:
    """Why :func:`attention_kernel` returned None (None before the first call or when it is available)."""
    return _WHY_NOT


def reset() -> None:
    """Forget the outcome, so the next :func:`attention_kernel` call tries again (tests; a changed
    environment)."""
    global _KERNEL, _WHY_NOT, _TRIED
    with _LOCK:
        _KERNEL, _WHY_NOT, _TRIED = None, None, False


class _Unavailable(Exception):
    pass


def _load() -> AttentionKernel:
    if os.environ.get("DENSEBEAM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("DENSEBEAM_NATIVE=0")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise _Unavailable(f"the CPU is {platform.machine()}, not x86-64")
    missing = [f for f in CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        raise _Unavailable(f"the CPU lacks {', '.join(missing)}")
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler ($CC, cc, gcc or clang) on PATH")
    kernel = AttentionKernel(_build(cc))
    _self_check(kernel)
    return kernel


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    root = os.environ.get("DENSEBEAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "densebeam")
    return Path(root) / "native"


def _build(cc: str) -> str:
    """Path of the compiled library for this source, flags and compiler, compiling it if needed."""
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unavailable(f"the C compiler {cc} does not run: {err}") from err
    key = hashlib.sha256(source + repr((FLAGS, cc, version)).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"attention-{key}.so"
    if target.exists():
        return str(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".attention-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise _Unavailable(f"{os.path.basename(cc)} could not build {SOURCE.name}: "
                               f"{(done.stderr or done.stdout).strip()[-400:]}")
        os.replace(tmp, target)  # atomic: a concurrent worker loads a whole library or builds its own
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built the native attention kernel: %s", target)
    return str(target)


def reference_attention(qkv: np.ndarray, groups, heads: int, head_dim: int) -> np.ndarray:
    """Float64 attention over packed rows (the definition the kernel is checked against)."""
    qkv = np.asarray(qkv, dtype=np.float64)
    out = np.zeros((qkv.shape[0], heads * head_dim))
    for row, n, length in groups:
        x = qkv[row:row + n * length].reshape(n, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        scores = x[0] @ x[1].transpose(0, 1, 3, 2)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[row:row + n * length] = (w @ x[2]).transpose(0, 2, 1, 3).reshape(n * length, heads * head_dim)
    return out


def _self_check(kernel: AttentionKernel) -> None:
    """The built kernel against :func:`reference_attention` on a small random layer (lengths that are
    and are not multiples of 16, an odd one, a single token): a miscompiled or misbehaving kernel is
    never used."""
    import torch

    a = np.arange(256, dtype=np.int32).reshape(16, 16)
    if not np.array_equal(kernel.transpose16(a), a.T):
        raise RuntimeError("the native attention kernel failed its self-check (transpose)")
    gen = torch.Generator().manual_seed(0)
    heads, hd = 2, 32
    groups = [(0, 2, 37), (74, 1, 16), (90, 3, 5), (105, 1, 1)]
    rows = 106
    qkv = (torch.randn(rows, 3 * heads * hd, generator=gen) * 0.5).to(torch.bfloat16)
    ctx = torch.zeros(rows, heads * hd, dtype=torch.bfloat16)
    kernel.attend(qkv, ctx, groups, heads, hd)
    ref = reference_attention(qkv.float().numpy(), groups, heads, hd)
    err = float(np.max(np.abs(ctx.float().numpy() - ref)))
    if not err < 2e-2:
        raise RuntimeError(f"the native attention kernel failed its self-check (max error {err:.3g})")
