"""Which nprobe a search for k hits needs, from the recall curves a build measured. Pure functions over
the manifest (its JSON object or its typed record): no I/O, no Beam.

A build measures recall@k against exact search at each candidate nprobe for several k (10, 100 and 1000
by default: a reranker's depth or an evaluation's R@1000 need many more of the true neighbours than the
top 10 do) and records, per k, the smallest nprobe reaching its target (``nprobe_by_k``). A search for
k hits uses the nprobe measured for the smallest measured k' >= k: at a fixed nprobe recall@k generally
falls as k grows (the farther neighbours sit in farther lists), so that nprobe is the safe side.
"""

from __future__ import annotations

from typing import Mapping, Sequence

DEFAULT_KS = (10, 100, 1000)


def smallest_reaching(curve: Sequence[Mapping], target: float) -> dict:
    """The first point (curves are sorted by nprobe) whose recall reaches ``target``; else the last one:
    exhaustive (nprobe = nlist), or for a compact codec over many lists the most lists measured."""
    if not curve:
        raise ValueError("an empty recall curve has no nprobe to choose")
    return dict(next((c for c in curve if c["recall"] >= target), curve[-1]))


def nprobe_by_k(curves: Mapping[int, Sequence[Mapping]], target: float) -> dict[int, dict]:
    """``{k: {"nprobe", "recall"}}``: per k, the smallest measured nprobe reaching ``target``. Made
    monotone in k (never fewer lists for a larger k), so measurement noise cannot make a search for
    more hits probe fewer lists."""
    out: dict[int, dict] = {}
    floor = 0
    for k in sorted(curves):
        point = smallest_reaching(curves[k], target)
        if point["nprobe"] < floor:
            point = next(c for c in curves[k] if c["nprobe"] >= floor)
        out[k] = dict(point)
        floor = point["nprobe"]
    return out


def _power_of_two_at_least(x: float) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def nprobe_for_k(manifest, k: int) -> int:
    """The nprobe to search a bundle with when asking for ``k`` hits; ``manifest`` is the manifest's JSON
    object or a bundle's typed record.

    - The nprobe measured for the smallest measured k' >= k (``nprobe_by_k``).
    - k above every measured k: the largest measured k's nprobe times k / k_max (probing proportionally
      more lists for proportionally more hits), rounded up to a power of two. An estimate, not a
      measurement: build with ``--k`` covering the k you search with.
    - A bundle from before per-k curves: its one ``nprobe`` (measured at ``k``, 10) is the measured k.
    Always within 1..nlist.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if isinstance(manifest, Mapping):  # the JSON object a build writes
        nlist = int(manifest.get("nlist") or 1)
        measured = {int(key): int(v["nprobe"]) for key, v in (manifest.get("nprobe_by_k") or {}).items()}
        single = (int(manifest.get("k") or 10), int(manifest.get("nprobe") or 1))
    else:  # a bundle's typed record (index_store.artifacts.bundle_manifest.Manifest)
        nlist = manifest.nlist
        measured = {key: point.nprobe for key, point in manifest.nprobe_by_k.items()}
        single = (manifest.k, manifest.nprobe)
    if not measured:
        measured = dict([single])
    above = [m for m in sorted(measured) if m >= k]
    if above:
        nprobe = measured[above[0]]
    else:
        k_max = max(measured)
        nprobe = _power_of_two_at_least(measured[k_max] * k / k_max)
    return max(1, min(nprobe, nlist))
