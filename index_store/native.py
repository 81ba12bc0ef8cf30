"""Native kernels of the packed bf16 forward (``kernels_avx512.c``), built on first use. No Beam import.

PyTorch runs a packed layer's attention as a few small operations per group of equal-length passages
(score products, a float32 softmax, conversions, copies): 22% of the bf16 forward pass of
all-MiniLM-L6-v2 on a 2-core AVX-512 CPU, though its arithmetic is under 1% of the layer's; and each
residual connection as an add and a layer norm, two passes over the activations. The C kernels do a
layer's attention in one call (scores kept in float32) and each residual add with its layer norm in one
pass (the sum kept in float32): ``bench/encode_bench.py --attention`` measures them against the PyTorch
operations they replace.

They are compiled once per machine with the C compiler found (``$CC``, else ``cc``, ``gcc`` or ``clang``)
into ``$DENSEBEAM_CACHE_DIR/native`` (default ``~/.cache/densebeam/native``), named by a hash of the
source, the flags and the compiler's version; the file is written under a temporary name and renamed, so
concurrent workers never load half a library. The build is checked against float64 references before
its first use. The kernels run only where they can: an x86-64 CPU with AVX-512 F, BW and BF16, bf16
products, a head size that is a multiple of 32. Anywhere else (another CPU, no compiler, a failed build
or check, ``DENSEBEAM_NATIVE=0``) the PyTorch operations run, and the log says why once per process.
Which ran is recorded in the ``auto`` precision measurement. The residual add + layer norm kernels: in
``bf16-mixed`` (a float32 residual stream) one pass computes PyTorch's float32 arithmetic and also writes
the bf16 copy the next product takes (where PyTorch makes four passes), on by default; in ``bf16`` (a bf16
stream) the kernel keeps a sum in float32 that PyTorch rounds to bf16, so it runs only when asked
(``PackedBert(..., fused_layernorm=True)``).
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

SOURCE = Path(__file__).with_name("kernels_avx512.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma", "-ffp-contract=off", "-fPIC", "-shared")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
NAME = "avx512-bf16"  # what the measurement record calls this kernel

_LOCK = threading.Lock()
_START_LOCK = threading.Lock()
_KERNEL: Optional["NativeKernels"] = None
_WHY_NOT: Optional[str] = None  # why the kernel is not available, once known
_TRIED = False
_STARTED = False  # prepare() has started a build thread
_DONE = False  # the outcome is known


class NativeKernels:
    """The loaded library. Thread-safe: ctypes releases the GIL for each call and the kernels keep no
    state."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self._attend = lib.densebeam_attend_bf16
        self._attend.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                 ctypes.c_int64, ctypes.c_int64]
        self._attend.restype = ctypes.c_int
        self._add_ln = lib.densebeam_add_layernorm_bf16
        self._add_ln.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
        self._add_ln.restype = ctypes.c_int
        self._add_ln_mixed = lib.densebeam_add_layernorm_mixed
        self._add_ln_mixed.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]
        self._add_ln_mixed.restype = ctypes.c_int
        self._transpose = lib.densebeam_transpose16
        self._transpose.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._transpose.restype = None

    def attend(self, qkv, ctx, groups, heads: int, head_dim: int) -> None:
        """``ctx`` <- the attention of ``qkv`` (rows, 3 * heads * head_dim; each row q | k | v) over
        ``groups`` ((first row, passages, length) triples), both contiguous bf16 CPU tensors."""
        _check_bf16(qkv, ctx)
        g = np.ascontiguousarray(np.asarray(groups, dtype=np.int64).reshape(-1, 3))
        if qkv.shape[1] != 3 * heads * head_dim or ctx.shape[1] != heads * head_dim:
            raise ValueError(f"qkv {tuple(qkv.shape)} and ctx {tuple(ctx.shape)} do not hold {heads} heads "
                             f"of {head_dim}")
        if len(g):
            ends = g[:, 0] + g[:, 1] * g[:, 2]
            if (g < 0).any() or (g[:, 1:] < 1).any() or int(ends.max()) > min(qkv.shape[0], ctx.shape[0]):
                raise ValueError(f"groups reach row {int(ends.max())} (or are empty); qkv {tuple(qkv.shape)}, "
                                 f"ctx {tuple(ctx.shape)}")
        rc = self._attend(qkv.data_ptr(), ctx.data_ptr(), g.ctypes.data, len(g), heads, head_dim)
        if rc:
            raise RuntimeError(f"native attention failed ({'out of memory' if rc == -1 else f'code {rc}'})")

    def add_layernorm(self, a, h, gamma, beta, eps: float):
        """LayerNorm(a + h) * gamma + beta, a new bf16 tensor: ``a`` and ``h`` (rows, cols) contiguous
        bf16, ``gamma`` and ``beta`` (cols,) contiguous float32."""
        import torch

        _check_bf16(a, h)
        if a.shape != h.shape or a.dim() != 2 or gamma.shape != (a.shape[1],) or beta.shape != gamma.shape:
            raise ValueError(f"shapes {tuple(a.shape)}, {tuple(h.shape)}, {tuple(gamma.shape)}, {tuple(beta.shape)}")
        if gamma.dtype != torch.float32 or beta.dtype != torch.float32 or not (gamma.is_contiguous()
                                                                              and beta.is_contiguous()):
            raise TypeError("gamma and beta must be contiguous float32")
        out = torch.empty_like(a)
        rc = self._add_ln(a.data_ptr(), h.data_ptr(), gamma.data_ptr(), beta.data_ptr(), out.data_ptr(),
                          a.shape[0], a.shape[1], float(eps))
        if rc:
            raise RuntimeError(f"native layer norm failed (code {rc})")
        return out

    def add_layernorm_mixed(self, a, h, gamma, beta, eps: float, hb=None):
        """The bf16-mixed residual connection in one pass: ``h`` <- LayerNorm(float(a) + h) * gamma + beta
        (in place) and ``hb`` <- ``h`` rounded to bf16 (allocated when None); returns ``hb``. ``a``
        (rows, cols) contiguous bf16; ``h`` the same shape, ``gamma`` and ``beta`` (cols,), contiguous
        float32."""
        import torch

        _check_bf16(a)
        if a.dim() != 2 or h.shape != a.shape or gamma.shape != (a.shape[1],) or beta.shape != gamma.shape:
            raise ValueError(f"shapes {tuple(a.shape)}, {tuple(h.shape)}, {tuple(gamma.shape)}, {tuple(beta.shape)}")
        for t in (h, gamma, beta):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise TypeError("h, gamma and beta must be contiguous float32 CPU tensors")
        if hb is None:
            hb = torch.empty_like(a)
        elif hb.shape != a.shape:
            raise ValueError(f"hb {tuple(hb.shape)} is not {tuple(a.shape)}")
        _check_bf16(hb)
        rc = self._add_ln_mixed(a.data_ptr(), h.data_ptr(), gamma.data_ptr(), beta.data_ptr(), hb.data_ptr(),
                                a.shape[0], a.shape[1], float(eps))
        if rc:
            raise RuntimeError(f"native layer norm failed (code {rc})")
        return hb

    def transpose16(self, a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a, dtype=np.int32).reshape(16, 16)
        out = np.empty_like(a)
        self._transpose(a.ctypes.data, out.ctypes.data)
        return out


def _check_bf16(*tensors) -> None:
    import torch

    for t in tensors:
        if t.dtype != torch.bfloat16:
            raise TypeError(f"the native kernels take bf16 tensors, not {t.dtype}")
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the native kernels take contiguous CPU tensors")


def kernels() -> Optional[NativeKernels]:
    """The native kernels, built and checked on the first call of the process; None where they cannot
    run (:func:`why_not` says why)."""
    global _KERNEL, _WHY_NOT, _TRIED, _DONE
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            try:
                _KERNEL = _load()
            except _Unavailable as err:
                _WHY_NOT = str(err)
                log.info("native kernels not used: %s; PyTorch's operations run instead", err)
            except Exception as err:  # noqa: BLE001 - an optional fast path: any failure falls back
                _WHY_NOT = f"{type(err).__name__}: {err}"
                log.warning("native kernels not used (%s); PyTorch's operations run instead", _WHY_NOT)
            _DONE = True
        return _KERNEL


def prepare() -> None:
    """Start deciding (and, the first time on a machine, building) the kernel in a background thread, so
    the compiler runs while the model loads; :func:`kernels` waits for it."""
    global _STARTED
    with _START_LOCK:  # not _LOCK: a build in progress holds that one
        if _TRIED or _STARTED:
            return
        _STARTED = True
    threading.Thread(target=kernels, name="densebeam-native-build", daemon=True).start()


def planned() -> str:
    """:data:`NAME` where this machine is set up to run the kernels (the CPU, a compiler, not turned
    off), else ``torch``; the outcome of the build once it is known. Does not wait for a build."""
    if _DONE:  # no lock: a build in progress holds it
        return NAME if _KERNEL is not None else "torch"
    try:
        _environment_allows()
    except _Unavailable:
        return "torch"
    return NAME


def why_not() -> Optional[str]:
    """Why :func:`kernels` returned None (None before the first call or when it is available)."""
    return _WHY_NOT


def reset() -> None:
    """Forget the outcome, so the next :func:`kernels` call tries again (tests; a changed
    environment)."""
    global _KERNEL, _WHY_NOT, _TRIED, _STARTED, _DONE
    with _LOCK:
        _KERNEL, _WHY_NOT, _TRIED, _STARTED, _DONE = None, None, False, False, False


class _Unavailable(Exception):
    pass


def _load() -> NativeKernels:
    kernel = NativeKernels(_build(_environment_allows()))
    _self_check(kernel)
    return kernel


def _environment_allows() -> str:
    """The C compiler to build with; raises :class:`_Unavailable` when the kernels cannot run here."""
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
    return cc


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
    target = out_dir / f"kernels-{key}.so"
    if target.exists():
        return str(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=out_dir)
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
    log.info("built the native kernels: %s", target)
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


def reference_add_layernorm(a: np.ndarray, h: np.ndarray, gamma, beta, eps: float) -> np.ndarray:
    """Float64 LayerNorm(a + h) * gamma + beta."""
    x = np.asarray(a, dtype=np.float64) + np.asarray(h, dtype=np.float64)
    x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps)
    return x * np.asarray(gamma, dtype=np.float64) + np.asarray(beta, dtype=np.float64)


def _self_check(kernel: NativeKernels) -> None:
    """The built kernels against the float64 references on small random inputs (attention lengths that
    are and are not multiples of 16, an odd one, a single token): a miscompiled or misbehaving build is
    never used."""
    import torch

    a = np.arange(256, dtype=np.int32).reshape(16, 16)
    if not np.array_equal(kernel.transpose16(a), a.T):
        raise RuntimeError("the native kernels failed their self-check (transpose)")
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
    a, h = (torch.randn(5, 48, generator=gen).to(torch.bfloat16) for _ in range(2))
    gamma, beta = torch.rand(48, generator=gen) + 0.5, torch.randn(48, generator=gen)
    got = kernel.add_layernorm(a, h, gamma, beta, 1e-12).float().numpy()
    err = float(np.max(np.abs(got - reference_add_layernorm(a.float(), h.float(), gamma, beta, 1e-12))))
    if not err < 3e-2:
        raise RuntimeError(f"the native layer norm failed its self-check (max error {err:.3g})")
    h32 = h.float() + 1.5
    ref = reference_add_layernorm(a.float(), h32, gamma, beta, 1e-12)
    hb = kernel.add_layernorm_mixed(a, h32, gamma, beta, 1e-12)
    err = float(np.max(np.abs(h32.numpy() - ref)))
    rounded = np.abs(hb.float().numpy() - ref) <= np.abs(ref) * 2.0 ** -8 + 1e-5  # one bf16 rounding
    if not (err < 1e-4 and rounded.all()):
        raise RuntimeError(f"the native bf16-mixed layer norm failed its self-check (max error {err:.3g})")
