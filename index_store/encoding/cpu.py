"""What the CPU offers densebeam's arithmetic: its family, as the precision policy and the native kernels
see it. No Beam import.

The family decides what ``--precision auto`` may choose and which native kernels are built:

==============  ===========================================  =========================================
family          x86-64 flags                                 default precision on this CPU
==============  ===========================================  =========================================
``avx512-bf16`` AVX-512 F and BW with AVX512_BF16 or AMX-BF16 ``bf16-mixed`` when measured faithful
``avx512``      AVX-512 F and BW, no bf16 arithmetic          ``fp32`` (bf16 would be emulated)
``avx2``        AVX2 and FMA                                  ``fp32``
``arm64-bf16``  an aarch64 CPU listing ``bf16``              ``bf16-mixed`` when measured faithful
``other``       anything else                                 ``fp32``
==============  ===========================================  =========================================

The flags are read from ``/proc/cpuinfo`` and capped where the environment asks: by
``DENSEBEAM_MAX_CPU_ISA`` (densebeam's own cap, for its kernels and choices) and by
``ONEDNN_MAX_CPU_ISA`` (oneDNN's, which decides whether PyTorch's bf16 products run on bf16
instructions). Both take oneDNN's names (``AVX2``, ``AVX512_CORE``, ``AVX512_CORE_VNNI``,
``AVX512_CORE_BF16``, ...) or the family names above. :func:`limit_env` gives the settings that make
PyTorch, oneDNN, MKL and densebeam all run as a smaller family, to try another CPU family's code paths
on a machine that has more.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

FAMILIES = ("avx512-bf16", "avx512", "avx2", "arm64-bf16", "other")
# oneDNN's ISA names in increasing order; a cap removes every flag of the levels above it
_LEVELS = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni",
           "avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16")
_ALIASES = {"avx512": "avx512_core", "avx512-bf16": "avx512_core_bf16", "avx512_bf16": "avx512_core_bf16",
            "avx10_1_512": "avx512_core_fp16", "avx10_1_512_amx": "avx512_core_amx",
            "avx10_1_512_amx_fp16": "avx512_core_amx_fp16"}
_UNCAPPED = ("all", "default", "")


def _level_of_flag(flag: str) -> int:
    """The lowest oneDNN level that uses ``flag`` (0 for flags below AVX2 that no cap removes)."""
    if flag.startswith("amx"):
        return _LEVELS.index("avx512_core_amx")
    if flag in ("avx512_fp16",):
        return _LEVELS.index("avx512_core_fp16")
    if flag in ("avx512_bf16",):
        return _LEVELS.index("avx512_core_bf16")
    if flag in ("avx512_vnni",):
        return _LEVELS.index("avx512_core_vnni")
    if flag.startswith("avx512"):
        return _LEVELS.index("avx512_core")
    if flag in ("avx_vnni",):
        return _LEVELS.index("avx2_vnni")
    if flag in ("avx2", "fma"):
        return _LEVELS.index("avx2")
    return 0


def _cap_level(value: Optional[str], variable: str) -> Optional[int]:
    """The level index a cap names (None: no cap)."""
    name = (value or "").strip().lower()
    if name in _UNCAPPED:
        return None
    name = _ALIASES.get(name, name)
    if name not in _LEVELS:
        raise ValueError(f"{variable}={value!r} is not a CPU ISA name; use one of {', '.join(_LEVELS)} "
                         f"(or avx512, avx512-bf16), or unset it")
    return _LEVELS.index(name)


@functools.lru_cache(maxsize=1)
def _raw_flags() -> frozenset:
    key = "flags" if platform.machine().lower() in ("x86_64", "amd64") else "features"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip().lower() == key:
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cap() -> Optional[int]:
    """The lowest ISA cap in force (an index into oneDNN's levels), or None."""
    caps = [c for c in (_cap_level(os.environ.get("DENSEBEAM_MAX_CPU_ISA"), "DENSEBEAM_MAX_CPU_ISA"),
                        _cap_level(os.environ.get("ONEDNN_MAX_CPU_ISA"), "ONEDNN_MAX_CPU_ISA")) if c is not None]
    return min(caps) if caps else None


def flags() -> frozenset:
    """The CPU's flags as ``/proc/cpuinfo`` lists them, less those above the ISA cap in force."""
    level = cap()
    raw = _raw_flags()
    if level is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return raw
    return frozenset(f for f in raw if _level_of_flag(f) <= level)


def family() -> str:
    """This CPU's family (see the module's table), after the caps in force."""
    f = flags()
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64-bf16" if "bf16" in f else "other"
    if machine not in ("x86_64", "amd64"):
        return "other"
    if {"avx512f", "avx512bw"} <= f:
        return "avx512-bf16" if ("avx512_bf16" in f or "amx_bf16" in f) else "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "other"


def native_bf16() -> bool:
    """True when bf16 matrix products run on bf16 instructions here (AVX512_BF16 or AMX on x86-64, the
    bf16 extension on aarch64); elsewhere PyTorch emulates them, slower than float32."""
    return family() in ("avx512-bf16", "arm64-bf16")


def int16_without_bf16() -> bool:
    """An x86-64 family without bf16 arithmetic (AVX2, AVX-512): where ``auto`` measures or picks int16."""
    return family() in ("avx2", "avx512")


def describe() -> dict:
    """The CPU as a record: model name, family, the caps in force and the flags that decide the family."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    model = value.strip()
                    break
    except OSError:
        pass
    shown = sorted(f for f in flags() if f.startswith(("avx", "amx", "fma")) or f == "bf16")
    return {"model": model or platform.processor() or platform.machine(), "family": family(),
            "caps": {v: os.environ[v] for v in ("DENSEBEAM_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA",
                                                   "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                     if os.environ.get(v)},
            "flags": shown}


# family -> (DENSEBEAM/oneDNN cap, ATen dispatch, MKL instructions)
_LIMITS = {"avx512-bf16": ("AVX512_CORE_BF16", "avx512", "AVX512"),
           "avx512": ("AVX512_CORE_VNNI", "avx512", "AVX512"),
           "avx2": ("AVX2", "avx2", "AVX2")}


def limit_env(target: str) -> dict:
    """Environment variables under which PyTorch (``ATEN_CPU_CAPABILITY``), oneDNN
    (``ONEDNN_MAX_CPU_ISA``), MKL (``MKL_ENABLE_INSTRUCTIONS``) and densebeam (``DENSEBEAM_MAX_CPU_ISA``)
    use no instructions beyond the family ``target`` (``avx512-bf16``, ``avx512`` or ``avx2``): set them
    before the process starts to run another family's code paths on a CPU that has more. (The CPU itself
    stays what it is: its caches, clock and the speed of each instruction.)"""
    if target not in _LIMITS:
        raise ValueError(f"cannot limit to {target!r}; choose one of {', '.join(_LIMITS)}")
    isa, aten, mkl = _LIMITS[target]
    return {"DENSEBEAM_MAX_CPU_ISA": isa, "ONEDNN_MAX_CPU_ISA": isa, "ATEN_CPU_CAPABILITY": aten,
            "MKL_ENABLE_INSTRUCTIONS": mkl}


def can_limit_to(target: str) -> bool:
    """True when this process's CPU family (after the caps it runs under) has everything family
    ``target`` has, so a process started with :func:`limit_env` runs as ``target`` here."""
    order = ("avx2", "avx512", "avx512-bf16")
    mine = family()
    return target in order and mine in order and order.index(mine) >= order.index(target)
