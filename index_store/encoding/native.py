"""Native kernels of the packed forward, built on first use. No Beam import.

PyTorch runs a packed layer's attention as a few small operations per group of equal-length passages
(score products, a softmax, conversions, copies), and each residual connection as an add and a layer
norm, two passes over the activations. The C kernels do a layer's attention in one call and each
residual add with its layer norm in one pass; for ``int16``, the matrix products too. Three libraries:

* ``fp32`` (``kernels_fp32.c``), for ``fp32`` and ``int16``: float32 attention and residual add + layer
  norm, compiled for the CPU's family (AVX-512 F, or AVX2 and FMA; :mod:`index_store.encoding.cpu`).
* ``bf16`` (``kernels_avx512.c``), for ``bf16`` and ``bf16-mixed`` on CPUs with AVX-512 BF16: attention
  with bf16 inputs and float32 scores; the residual add + layer norm of ``bf16-mixed`` (a float32 stream:
  PyTorch's float32 arithmetic, also writing the bf16 copy the next product takes) and of ``bf16`` (a
  bf16 stream; the kernel keeps a sum in float32 that PyTorch rounds to bf16, so it runs only when asked,
  ``PackedBert(..., fused_layernorm=True)``).
* ``int16`` (``kernels_int16.c``), for ``--precision int16`` on CPUs without bf16 arithmetic: matrix
  products of inputs rounded per row to 14-bit and weights per output channel to 12-bit integers, summed
  exactly in 32-bit integers (AVX-512 BW with or without VNNI, or AVX2 with or without AVX-VNNI), with the
  feed-forward's GELU in the same pass; :class:`Int16Kernels`.

``bench/encode_bench.py --attention`` measures them against the PyTorch operations they replace.

They are compiled once per machine with the C compiler found (``$CC``, else ``cc``, ``gcc`` or ``clang``)
into ``$DENSEBEAM_CACHE_DIR/native`` (default ``~/.cache/densebeam/native``), named by a hash of the
source, the flags and the compiler's version; the file is written under a temporary name and renamed, so
concurrent workers never load half a library. Each build is checked against float64 references before
its first use. A library runs only where it can (the CPU family, a compiler, a head size it takes);
anywhere else (another CPU, no compiler, a failed build or check, ``DENSEBEAM_NATIVE=0``) the PyTorch
operations run, and the log says why once per process. Which ran is recorded in the ``auto`` precision
measurement. The outcome is decided once per process and setting: a changed ``DENSEBEAM_NATIVE``,
``CC``, ``DENSEBEAM_CACHE_DIR`` or CPU cap decides again.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from densebeam.index_store.encoding import cpu

log = logging.getLogger(__name__)

_COMMON = ("-O3", "-ffp-contract=off", "-fPIC", "-shared")
NAME = "avx512-bf16"  # what the measurement record calls the bf16 library


# The kernels' C signatures: attend(qkv, ctx, groups, n_groups, heads, head_dim) and
# add_layernorm(<n> tensor pointers, rows, hidden, eps); each returns 0 or an error code.
_ATTEND_ARGS = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3


def _add_ln_args(pointers: int) -> list:
    return [ctypes.c_void_p] * pointers + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]


def _bind(fn, argtypes: list, restype=ctypes.c_int):
    fn.argtypes, fn.restype = argtypes, restype
    return fn


@dataclasses.dataclass(frozen=True)
class _Variant:
    name: str  # recorded in the measurement (``kernels``)
    source: Path
    flags: tuple


def _variant(kind: str) -> Optional[_Variant]:
    """The build of library ``kind`` (``bf16``, ``fp32`` or ``int16``) for this CPU's family, or None."""
    family = cpu.family()
    here = Path(__file__).parent
    if kind == "bf16":
        if family != "avx512-bf16":
            return None
        return _Variant(NAME, here / "kernels_avx512.c", ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma") + _COMMON)
    if kind == "fp32":
        if family in ("avx512", "avx512-bf16"):
            return _Variant("fp32-avx512", here / "kernels_fp32.c", ("-mavx512f", "-mfma") + _COMMON)
        if family == "avx2":
            return _Variant("fp32-avx2", here / "kernels_fp32.c", ("-mavx2", "-mfma") + _COMMON)
        return None
    if kind == "int16":
        f = cpu.flags()
        if family in ("avx512", "avx512-bf16"):
            vnni = "avx512_vnni" in f
            return _Variant("int16-avx512" + ("-vnni" if vnni else ""), here / "kernels_int16.c",
                            ("-mavx512f", "-mavx512bw", "-mfma") + (("-mavx512vnni",) if vnni else ()) + _COMMON)
        if family == "avx2":
            vnni = "avx_vnni" in f
            return _Variant("int16-avx2" + ("-vnni" if vnni else ""), here / "kernels_int16.c",
                            ("-mavx2", "-mfma") + (("-mavxvnni",) if vnni else ()) + _COMMON)
        return None
    raise ValueError(f"no native library {kind!r}; choose bf16, fp32 or int16")


class NativeKernels:
    """The loaded bf16 library. Thread-safe: ctypes releases the GIL for each call and the kernels keep no
    state."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self._attend = _bind(lib.densebeam_attend_bf16, _ATTEND_ARGS)
        self._add_ln = _bind(lib.densebeam_add_layernorm_bf16, _add_ln_args(5))
        self._add_ln_mixed = _bind(lib.densebeam_add_layernorm_mixed, _add_ln_args(5))
        self._transpose = _bind(lib.densebeam_transpose16, [ctypes.c_void_p, ctypes.c_void_p], None)

    def attend(self, qkv, ctx, groups, heads: int, head_dim: int) -> None:
        """``ctx`` <- the attention of ``qkv`` (rows, 3 * heads * head_dim; each row q | k | v) over
        ``groups`` ((first row, passages, length) triples), both contiguous bf16 CPU tensors."""
        _check_bf16(qkv, ctx)
        g = _groups(groups, qkv, ctx, heads, head_dim)
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
    _check_dtype("bfloat16", *tensors)


class Fp32Kernels:
    """The loaded float32 library. Thread-safe: ctypes releases the GIL for each call and the kernels
    keep no state. ``lanes``: the vector width it was built for (16 or 8 floats); head sizes and row
    widths must be multiples of it."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self.lanes = int(lib.densebeam_fp32_lanes())
        self._attend = _bind(lib.densebeam_attend_fp32, _ATTEND_ARGS)
        self._add_ln = _bind(lib.densebeam_add_layernorm_fp32, _add_ln_args(4))

    def shape_problem(self, hidden: int, heads: int) -> Optional[str]:
        """Why these kernels cannot run a model of this width and head count (None: they can)."""
        if heads <= 0 or hidden % heads or (hidden // heads) % self.lanes:
            return f"head size {hidden}/{heads} is not a multiple of {self.lanes}"
        if hidden % self.lanes or hidden > 4096:
            return f"hidden size {hidden} is not a multiple of {self.lanes} up to 4096"
        return None

    def attend(self, qkv, ctx, groups, heads: int, head_dim: int) -> None:
        """``ctx`` <- the attention of ``qkv`` (rows, 3 * heads * head_dim; each row q | k | v, the score
        scale already in q) over ``groups`` ((first row, passages, length) triples), both contiguous
        float32 CPU tensors."""
        _check_dtype("float32", qkv, ctx)
        g = _groups(groups, qkv, ctx, heads, head_dim)
        rc = self._attend(qkv.data_ptr(), ctx.data_ptr(), g.ctypes.data, len(g), heads, head_dim)
        if rc:
            raise RuntimeError(f"native attention failed ({'out of memory' if rc == -1 else f'code {rc}'})")

    def add_layernorm(self, a, h, gamma, beta, eps: float):
        """``h`` <- LayerNorm(a + h) * gamma + beta, in place (returned): all contiguous float32 CPU
        tensors, ``a`` and ``h`` (rows, cols), ``gamma`` and ``beta`` (cols,)."""
        _check_dtype("float32", a, h, gamma, beta)
        if a.dim() != 2 or h.shape != a.shape or gamma.shape != (a.shape[1],) or beta.shape != gamma.shape:
            raise ValueError(f"shapes {tuple(a.shape)}, {tuple(h.shape)}, {tuple(gamma.shape)}, {tuple(beta.shape)}")
        rc = self._add_ln(a.data_ptr(), h.data_ptr(), gamma.data_ptr(), beta.data_ptr(), a.shape[0], a.shape[1],
                          float(eps))
        if rc:
            raise RuntimeError(f"native layer norm failed (code {rc})")
        return h


@dataclasses.dataclass(frozen=True)
class Int16Weights:
    """A linear layer's weights as :meth:`Int16Kernels.linear` takes them: ``packed`` (N / cols, K' / 2,
    cols, 2) int16 (K' = K rounded up to even), ``scales`` and ``bias`` (N,) float32."""
    packed: object
    scales: object
    bias: object
    n: int
    k: int


class Int16Kernels:
    """The loaded int16 library: matrix products with activations rounded per row to 14-bit and weights
    per output channel to 12-bit integers, summed exactly in 32-bit integers (``kernels_int16.c``).
    Thread-safe: ctypes releases the GIL for each call and the kernels keep no state. ``rows`` and
    ``cols``: the tile a product is cut into (row counts must be multiples of ``rows``, output widths of
    ``cols``)."""

    def __init__(self, path: str):
        self.path = path
        lib = ctypes.CDLL(path)
        self.rows, self.cols = int(lib.densebeam_i16_rows()), int(lib.densebeam_i16_cols())
        self.act_levels, self.weight_levels = int(lib.densebeam_i16_levels(0)), int(lib.densebeam_i16_levels(1))
        self._quantize = _bind(lib.densebeam_i16_quantize, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                            ctypes.c_void_p, ctypes.c_void_p])
        self._linear = _bind(lib.densebeam_i16_linear, [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int])

    def shape_problem(self, widths) -> Optional[str]:
        """Why products with these output widths cannot run here (None: they can)."""
        bad = sorted({int(n) for n in widths if int(n) <= 0 or int(n) % self.cols})
        return f"output widths {bad} are not multiples of {self.cols}" if bad else None

    def pack(self, w, b) -> Int16Weights:
        """``w`` (N, K) and ``b`` (N,) float32 tensors as the kernel takes them (done once per model)."""
        import torch

        w = w.detach().to("cpu", torch.float32)
        n, k = w.shape
        if n % self.cols:
            raise ValueError(f"output width {n} is not a multiple of {self.cols}")
        top = w.abs().amax(1)
        scales = torch.where(top > 0, top / self.weight_levels, torch.ones_like(top))
        q = torch.round(w / scales[:, None]).clamp(-self.weight_levels, self.weight_levels).to(torch.int16)
        if k % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        packed = q.reshape(n // self.cols, self.cols, q.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()
        return Int16Weights(packed, scales.contiguous(), b.detach().to("cpu", torch.float32).contiguous(), n, k)

    def linear(self, x, weights: Int16Weights, gelu: bool = False):
        """``x`` (rows, K) contiguous float32 CPU tensor, rows a multiple of ``rows``: the (rows, N) float32
        product plus bias (``gelu``: through GELU with the error function, as ``torch.nn.functional.gelu``)."""
        import torch

        _check_dtype("float32", x)
        rows, k = x.shape
        if k != weights.k or rows % self.rows:
            raise ValueError(f"x {tuple(x.shape)} against weights of {weights.k} inputs (rows a multiple of "
                             f"{self.rows})")
        kp = weights.packed.shape[1] * 2
        xq = torch.empty((rows, kp), dtype=torch.int16)
        sx = torch.empty(rows, dtype=torch.float32)
        if kp != k:  # an odd width: a zero input pairs the last one
            x = torch.nn.functional.pad(x, (0, kp - k))
        self._quantize(x.data_ptr(), rows, kp, xq.data_ptr(), sx.data_ptr())
        y = torch.empty((rows, weights.n), dtype=torch.float32)
        rc = self._linear(xq.data_ptr(), sx.data_ptr(), weights.packed.data_ptr(), weights.scales.data_ptr(),
                          weights.bias.data_ptr(), y.data_ptr(), rows, weights.n, kp, int(gelu))
        if rc:
            raise RuntimeError(f"native int16 product failed (code {rc})")
        return y


def _groups(groups, qkv, ctx, heads: int, head_dim: int) -> np.ndarray:
    """The groups as a contiguous int64 (n, 3) array, checked against the tensors' shapes."""
    g = np.ascontiguousarray(np.asarray(groups, dtype=np.int64).reshape(-1, 3))
    if qkv.dim() != 2 or ctx.dim() != 2 or qkv.shape[1] != 3 * heads * head_dim or ctx.shape[1] != heads * head_dim:
        raise ValueError(f"qkv {tuple(qkv.shape)} and ctx {tuple(ctx.shape)} do not hold {heads} heads "
                         f"of {head_dim}")
    if len(g):
        ends = g[:, 0] + g[:, 1] * g[:, 2]
        if (g < 0).any() or (g[:, 1:] < 1).any() or int(ends.max()) > min(qkv.shape[0], ctx.shape[0]):
            raise ValueError(f"groups reach row {int(ends.max())} (or are empty); qkv {tuple(qkv.shape)}, "
                             f"ctx {tuple(ctx.shape)}")
    return g


def _check_dtype(dtype: str, *tensors) -> None:
    import torch

    want = getattr(torch, dtype)
    for t in tensors:
        if t.dtype != want:
            raise TypeError(f"the native kernels take {dtype} tensors here, not {t.dtype}")
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("the native kernels take contiguous CPU tensors")


class _Unavailable(Exception):
    pass


class _Slot:
    """One library's outcome under one setting: built, checked and loaded once, by whoever asks first
    (or by :func:`prepare`'s thread)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.lock = threading.Lock()
        self.started = False
        self.done = False
        self.kernel = None
        self.why: Optional[str] = None

    def get(self, build: bool = True):
        with self.lock:
            if not self.done:
                if not build and not _built(self.kind):
                    return None  # not built on this machine yet, and not to be built now
                try:
                    self.kernel = _load(self.kind)
                except _Unavailable as err:
                    self.why = str(err)
                    log.info("native %s kernels not used: %s; PyTorch's operations run instead", self.kind, err)
                except Exception as err:  # noqa: BLE001 - an optional fast path: any failure falls back
                    self.why = f"{type(err).__name__}: {err}"
                    log.warning("native %s kernels not used (%s); PyTorch's operations run instead", self.kind,
                                self.why)
                self.done = True
            return self.kernel


_SLOTS: dict = {}
_SLOTS_LOCK = threading.Lock()


def _slot(kind: str) -> _Slot:
    key = (kind, os.environ.get("DENSEBEAM_NATIVE", ""), os.environ.get("CC", ""), str(cache_dir()),
           cpu.family(), cpu.cap())
    with _SLOTS_LOCK:
        if key not in _SLOTS:
            _SLOTS[key] = _Slot(kind)
        return _SLOTS[key]


def kernels(kind: str = "bf16", build: bool = True):
    """The native library ``kind`` (``bf16``: :class:`NativeKernels`, ``fp32``: :class:`Fp32Kernels`),
    built and checked on the first call; None where it cannot run (:func:`why_not` says why). With
    ``build=False``, None (and nothing decided) when this machine has not built it yet: a caller that can
    do without it does not wait for a compiler."""
    return _slot(kind).get(build)


def prepare(*kinds: str) -> None:
    """Start deciding (and, the first time on a machine, building) the libraries ``kinds``, in this order,
    in a background thread, so the compiler runs while the model loads; :func:`kernels` waits for them."""
    todo = []
    for kind in kinds:
        slot = _slot(kind)
        with _SLOTS_LOCK:  # not the slot's lock: a build in progress holds that one
            if slot.started or slot.done:
                continue
            slot.started = True
        todo.append(slot)
    if todo:
        threading.Thread(target=lambda: [slot.get() for slot in todo], name="densebeam-native-build",
                         daemon=True).start()


def planned(kind: str = "bf16") -> str:
    """The name of library ``kind``'s build where this machine is set up to run it (the CPU, a compiler,
    not turned off), else ``torch``; the outcome of the build once it is known. Does not wait for a
    build."""
    slot = _slot(kind)
    if slot.done:  # no lock: a build in progress holds it
        return slot.kernel.name if slot.kernel is not None else "torch"
    try:
        return _environment_allows(kind)[0].name
    except _Unavailable:
        return "torch"


def why_not(kind: str = "bf16") -> Optional[str]:
    """Why :func:`kernels` returned None for ``kind`` (None before the first call or when it is
    available)."""
    return _slot(kind).why


def _built(kind: str) -> bool:
    """True when library ``kind`` is already compiled for this machine (loading it costs milliseconds)."""
    try:
        variant, cc = _environment_allows(kind)
        return os.path.exists(_target(cc, variant))
    except _Unavailable:
        return True  # nothing to build: deciding costs nothing


def _load(kind: str):
    variant, cc = _environment_allows(kind)
    path = _build(cc, variant)
    if kind == "bf16":
        kernel = NativeKernels(path)
        _check_bf16_build(kernel)
    elif kind == "int16":
        kernel = Int16Kernels(path)
        _check_int16_build(kernel)
    else:
        kernel = Fp32Kernels(path)
        _check_fp32_build(kernel)
    kernel.name = variant.name
    return kernel


def _environment_allows(kind: str) -> tuple[_Variant, str]:
    """The build to make and the C compiler to make it with; raises :class:`_Unavailable` when library
    ``kind`` cannot run here."""
    if os.environ.get("DENSEBEAM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise _Unavailable("DENSEBEAM_NATIVE=0")
    variant = _variant(kind)
    if variant is None:
        need = "AVX-512 BF16" if kind == "bf16" else "AVX-512 F and BW, or AVX2 and FMA"
        raise _Unavailable(f"the CPU (family {cpu.family()}) lacks {need}")
    cc = _compiler()
    if cc is None:
        raise _Unavailable("no C compiler ($CC, cc, gcc or clang) on PATH")
    return variant, cc


def _compiler() -> Optional[str]:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def cache_dir() -> Path:
    root = os.environ.get("DENSEBEAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "densebeam")
    return Path(root) / "native"


def _target(cc: str, variant: _Variant) -> Path:
    """Where the library of this source, flags and compiler (version included) is kept."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unavailable(f"the C compiler {cc} does not run: {err}") from err
    key = hashlib.sha256(variant.source.read_bytes() + repr((variant.flags, cc, version)).encode()).hexdigest()[:16]
    return cache_dir() / f"{variant.source.stem}-{key}.so"


def _build(cc: str, variant: _Variant) -> str:
    """Path of the compiled library for this source, flags and compiler, compiling it if needed."""
    target = _target(cc, variant)
    out_dir = target.parent
    if target.exists():
        return str(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{variant.source.stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *variant.flags, "-o", tmp, str(variant.source)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise _Unavailable(f"{os.path.basename(cc)} could not build {variant.source.name}: "
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


def _check_bf16_build(kernel: NativeKernels) -> None:
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


def _check_fp32_build(kernel: Fp32Kernels) -> None:
    """The built float32 kernels against the float64 references on small random inputs (lengths around
    the vector width, a single token): a miscompiled or misbehaving build is never used."""
    import torch

    gen = torch.Generator().manual_seed(0)
    heads, hd = 2, 2 * kernel.lanes
    groups = [(0, 2, 37), (74, 1, 16), (90, 3, 5), (105, 1, 1)]
    qkv = torch.randn(106, 3 * heads * hd, generator=gen) * 0.5
    ctx = torch.zeros(106, heads * hd)
    kernel.attend(qkv, ctx, groups, heads, hd)
    err = float(np.max(np.abs(ctx.numpy() - reference_attention(qkv.numpy(), groups, heads, hd))))
    if not err < 1e-5:
        raise RuntimeError(f"the native float32 attention failed its self-check (max error {err:.3g})")
    a, h = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen) + 1.5
    gamma, beta = torch.rand(48, generator=gen) + 0.5, torch.randn(48, generator=gen)
    ref = reference_add_layernorm(a.numpy(), h.numpy(), gamma, beta, 1e-12)
    err = float(np.max(np.abs(kernel.add_layernorm(a, h, gamma, beta, 1e-12).numpy() - ref)))
    if not err < 1e-4:
        raise RuntimeError(f"the native float32 layer norm failed its self-check (max error {err:.3g})")


def _check_int16_build(kernel: Int16Kernels) -> None:
    """The built int16 products against float64 on small random inputs (an odd input width, rows with an
    outlier, a row of zeros): within the rounding of both operands, and a row's result the same bits
    whichever rows share its call."""
    import torch

    gen = torch.Generator().manual_seed(0)
    n, k = 2 * kernel.cols, 301  # 301 inputs: more than two exact blocks, padded to even
    w, b = torch.randn(n, k, generator=gen) * 0.1, torch.randn(n, generator=gen)
    x = torch.randn(4 * kernel.rows, k, generator=gen)
    x[1, 7] = 40.0
    x[2] = 0.0
    packed = kernel.pack(w, b)
    y = kernel.linear(x, packed).numpy()
    ref = x.double().numpy() @ w.double().numpy().T + b.double().numpy()
    # rounding: half a step of each operand times the other's magnitude, summed over the inputs
    xd, wd = x.double().numpy(), w.double().numpy()
    x_step = np.abs(xd).max(1, keepdims=True) / kernel.act_levels
    w_step = np.abs(wd).max(1) / kernel.weight_levels
    bound = 0.5 * (x_step * (np.abs(wd).sum(1) + k * w_step) + np.abs(xd).sum(1, keepdims=True) * w_step) * 1.01 + 1e-5
    if not (np.abs(y - ref) <= bound).all():
        raise RuntimeError(f"the native int16 product failed its self-check (max error {np.abs(y - ref).max():.3g})")
    alone = kernel.linear(x[kernel.rows:2 * kernel.rows].contiguous(), packed).numpy()
    if not np.array_equal(alone, y[kernel.rows:2 * kernel.rows]):
        raise RuntimeError("the native int16 product failed its self-check (a row depends on its batch)")
