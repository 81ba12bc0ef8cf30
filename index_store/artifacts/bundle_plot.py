"""Pictures of an index bundle's manifest as plain SVG text: recall@k against nprobe for every measured k
(each k's chosen nprobe marked, the target recall dashed), for a tiered bundle recall@k against nprobe
for every refine factor r, and the build's worker-seconds per stage.

    densebeam inspect BUNDLE --plot bundle.svg

No plotting library: the query side installs without one, and the pictures are a few kilobytes of text
that diff and render anywhere (browsers, GitHub's markdown). Everything drawn comes from the manifest,
so any bundle can be drawn without opening its index. A manifest without per-k curves (bundles from
before them) draws its one ``recall_curve``; one without ``timings`` says so in the picture.

Each curve is a ``<polyline data-k="K">`` and each chosen nprobe a ``<circle class="chosen" data-k="K"
data-nprobe="P">`` with a ``<title>`` (a tooltip in browsers), so a picture can also be read by a script.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

WIDTH = 700
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
# The order the build runs its stages in (transforms/index.py records them); others follow by name.
STAGE_ORDER = ("sample", "kmeans", "kmeans_coarse", "kmeans_fine", "kmeans_refine", "add", "exact_topk",
               "write_shard", "approx_topk", "recall_curves", "merge")


@dataclasses.dataclass(frozen=True)
class Panel:
    """One picture's elements, drawn from y = 0; ``svg`` stacks panels."""
    height: int
    body: list[str]
    summary: str  # what the panel shows, for a message


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _point(p: object, where: str) -> dict:
    if not (isinstance(p, Mapping) and isinstance(p.get("nprobe"), int) and not isinstance(p["nprobe"], bool)
            and p["nprobe"] >= 1 and _number(p.get("recall")) and 0 <= p["recall"] <= 1):
        raise ValueError(f"{where} holds {str(p)[:80]}, not a point {{nprobe >= 1, recall in [0, 1]}}; "
                         "the manifest is damaged: rebuild the bundle")
    return {"nprobe": p["nprobe"], "recall": float(p["recall"])}


def recall_curves(manifest: Mapping) -> dict[int, list[dict]]:
    """``{k: [{"nprobe", "recall"}, ...]}`` sorted by k and nprobe: ``recall_curves`` (every measured k),
    else the single ``recall_curve`` of an older bundle (measured at ``k``, 10 before ``k`` was
    recorded), else empty. Raises ValueError on malformed points."""
    raw = manifest.get("recall_curves")
    if not raw and manifest.get("recall_curve"):
        raw = {str(manifest.get("k") or 10): manifest["recall_curve"]}
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"the manifest's recall_curves is a {type(raw).__name__}, not a mapping k -> curve; "
                         "rebuild the bundle")
    out = {}
    for key, curve in raw.items():
        if not str(key).isdigit() or not isinstance(curve, list):
            raise ValueError(f"the manifest's recall curve for k = {str(key)[:20]!r} is malformed; rebuild the bundle")
        points = [_point(p, f"recall_curves[{key}][{i}]") for i, p in enumerate(curve)]
        if points:
            out[int(key)] = sorted(points, key=lambda p: p["nprobe"])
    return dict(sorted(out.items()))


def chosen_nprobes(manifest: Mapping) -> dict[int, dict]:
    """``{k: {"nprobe", "recall"}}``: the nprobe the build chose per k (``nprobe_by_k``), else an older
    bundle's one ``nprobe`` / ``recall_at_k`` at its ``k``."""
    raw = manifest.get("nprobe_by_k")
    if not raw and _number(manifest.get("recall_at_k")) and isinstance(manifest.get("nprobe"), int):
        raw = {str(manifest.get("k") or 10): {"nprobe": manifest["nprobe"], "recall": manifest["recall_at_k"]}}
    if not isinstance(raw, Mapping):
        return {}
    return {int(k): _point(v, f"nprobe_by_k[{k}]") for k, v in raw.items() if str(k).isdigit()}


def _seconds(x: float) -> str:
    return f"{x:.2f} s" if x < 1 else f"{x:.1f} s"


def _title(manifest: Mapping, what: str) -> str:
    vectors = (manifest.get("counts") or {}).get("vectors")
    size = f"{vectors:,} vectors" if isinstance(vectors, int) else "? vectors"
    return escape(f"{manifest.get('factory', '?')}, {size}: {what}")


def _message_panel(title: str, lines: Sequence[str], summary: str) -> Panel:
    body = [f'<text x="10" y="20" font-size="14">{title}</text>']
    body += [f'<text x="10" y="{44 + 16 * i}" fill="#666">{escape(line)}</text>' for i, line in enumerate(lines)]
    return Panel(36 + 16 * len(lines) + 8, body, summary)


def refine_curves(manifest: Mapping) -> tuple[int, dict[int, list[dict]], dict[int, dict]]:
    """A tiered bundle's (smallest k, {refine factor r: its recall@k curve}, {chosen r: its point}), or
    (0, {}, {}) for a bundle without refinement."""
    refine = manifest.get("refine")
    if not isinstance(refine, Mapping) or not isinstance(refine.get("curves"), Mapping) or not refine["curves"]:
        return 0, {}, {}
    k = min(int(x) for x in refine["curves"] if str(x).isdigit())
    by_r = refine["curves"][str(k)]
    curves = {int(r): sorted((_point(p, f"refine.curves[{k}][{r}][{i}]") for i, p in enumerate(c)),
                             key=lambda p: p["nprobe"]) for r, c in by_r.items() if str(r).isdigit()}
    r = (refine.get("factors_by_k") or {}).get(str(k))
    chosen = chosen_nprobes(manifest).get(k)
    return k, dict(sorted(curves.items())), ({int(r): chosen} if isinstance(r, int) and chosen else {})


def recall_panel(manifest: Mapping, width: int = WIDTH, height: int = 340, curves=None, chosen=None,
                 key: str = "k", what: str = "recall@k against exact search") -> Panel:
    """recall@k against nprobe (log2 axis), one line per k (or per ``key`` of the ``curves`` given), each
    one's chosen nprobe marked by a dot and a dotted drop to the axis, the target recall dashed. Recall
    is linear in y over [lo, 1], lo the tenth below the lowest value drawn."""
    if curves is None:
        curves, chosen = recall_curves(manifest), chosen_nprobes(manifest)
    title = _title(manifest, what)
    if not curves:
        return _message_panel(title, ["this manifest records no recall curve (a bundle written by another tool?)"],
                              "no recall curves in the manifest")
    target = manifest.get("target_recall") if _number(manifest.get("target_recall")) else None
    left, right, top, bottom = 60, 220, 48, 45
    nmax = max(p["nprobe"] for curve in curves.values() for p in curve)
    lowest = min([p["recall"] for curve in curves.values() for p in curve] + ([target] if target else []))
    lo = min(0.9, math.floor(lowest * 10) / 10)
    span = max(1.0, math.log2(nmax))

    def xy(nprobe: float, recall: float) -> tuple[float, float]:
        return (left + (width - left - right) * math.log2(nprobe) / span,
                top + (height - top - bottom) * (1 - (recall - lo) / (1 - lo)))

    x_end, y_axis = width - right, height - bottom
    body = [f'<text x="10" y="20" font-size="14">{title}</text>']
    if manifest.get("recall_measured_on"):
        body.append(f'<text x="10" y="36" font-size="11" fill="#666">measured on '
                    f'{escape(str(manifest["recall_measured_on"]))}</text>')
    for i in range(int(round((1 - lo) * 10)) + 1):
        r = lo + i / 10
        _, y = xy(1, r)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{x_end}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{r:.1f}</text>')
    step = 2 if span <= 8 else 4  # at most ~9 tick labels
    p = 1
    while p <= nmax:
        x, _ = xy(p, lo)
        body.append(f'<text x="{x:.1f}" y="{y_axis + 16}" text-anchor="middle">{p}</text>')
        p *= step
    nlist = manifest.get("nlist")
    body.append(f'<text x="{(left + x_end) / 2:.0f}" y="{height - 8}" text-anchor="middle">nprobe (lists probed'
                f'{f" of {nlist}" if isinstance(nlist, int) else ""}, log scale)</text>')
    legend = []  # (label, colour, dash) from the top of the plot area down, on the right
    if target:
        _, y = xy(1, target)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{x_end}" y2="{y:.1f}" stroke="#888" stroke-dasharray="4 3"/>')
        legend.append((f"target recall {target}", "#888", "4 3"))
    for i, (k, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(p["nprobe"], p["recall"]) for p in curve))
        body.append(f'<polyline data-{key}="{k}" points="{points}" fill="none" stroke="{colour}" stroke-width="2">'
                    f'<title>{key} = {k}</title></polyline>')
        label = f"{key} = {k}"
        if k in chosen:
            c = chosen[k]
            x, y = xy(c["nprobe"], c["recall"])
            body.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y_axis}" stroke="{colour}" '
                        f'stroke-dasharray="1 2"/>'
                        f'<circle class="chosen" data-{key}="{k}" data-nprobe="{c["nprobe"]}" cx="{x:.1f}" '
                        f'cy="{y:.1f}" r="4.5" fill="{colour}"><title>{key} = {k}: nprobe {c["nprobe"]}, recall '
                        f'{c["recall"]:.4f}</title></circle>')
            label += f": nprobe {c['nprobe']} ({c['recall']:.3f})"
        legend.append((label, colour, "none"))
    for i, (label, colour, dash) in enumerate(legend):
        y = top + 4 + 18 * i
        body.append(f'<line x1="{x_end + 10}" y1="{y}" x2="{x_end + 30}" y2="{y}" stroke="{colour}" stroke-width="2" '
                    f'stroke-dasharray="{dash}"/><text x="{x_end + 36}" y="{y + 4}" fill="{colour}">'
                    f'{escape(label)}</text>')
    ks = ", ".join(map(str, curves))
    marked = ", ".join(f"{k}: {c['nprobe']}" for k, c in chosen.items() if k in curves)
    summary = f"{what.split(' against')[0]} against nprobe for {key} = {ks}" + (
        f" (chosen nprobe {marked})" if marked else "")
    return Panel(height, body, summary)


def timings_panel(manifest: Mapping, width: int = WIDTH) -> Panel:
    """The build's worker-seconds per stage (manifest ``timings``) as horizontal bars. Seconds are summed
    over a stage's parts (shards, k-means groups), which run side by side on several workers, so the
    total is worker time, not wall time."""
    timings = manifest.get("timings")
    title = _title(manifest, "worker-seconds per build stage")
    if not timings:
        return _message_panel(title, ["this manifest records no build timings (bundles built before densebeam "
                                      "recorded them have none)"], "no build timings in the manifest")
    if not isinstance(timings, Mapping) or not all(
            isinstance(t, Mapping) and _number(t.get("seconds")) and t["seconds"] >= 0 for t in timings.values()):
        raise ValueError("the manifest's timings are malformed (expected {stage: {seconds, parts, max_part}}); "
                         "rebuild the bundle")
    stages = [s for s in STAGE_ORDER if s in timings] + sorted(set(timings) - set(STAGE_ORDER))
    most = max(t["seconds"] for t in timings.values()) or 1.0
    total = sum(t["seconds"] for t in timings.values())
    left, bar, top = 120, 22, 44
    body = [f'<text x="10" y="20" font-size="14">{title}</text>',
            f'<text x="10" y="36" font-size="11" fill="#666">{_seconds(total)[:-2]} worker-s in all; the parts of a '
            'stage run side by side on the workers</text>']
    for i, stage in enumerate(stages):
        t = timings[stage]
        y = top + i * bar
        w = (width - left - 230) * t["seconds"] / most
        parts = t.get("parts") if isinstance(t.get("parts"), int) else 1
        note = ""
        if parts > 1:
            note = f" ({parts} parts" + (f", longest {_seconds(t['max_part'])})" if _number(t.get("max_part")) else ")")
        body.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(str(stage))}</text>'
                    f'<rect data-stage={quoteattr(str(stage))} x="{left}" y="{y + 3}" width="{w:.1f}" '
                    f'height="{bar - 6}" fill="#1f77b4"/>'
                    f'<text x="{left + w + 6:.1f}" y="{y + 15}">{_seconds(t["seconds"])}{note}</text>')
    return Panel(top + bar * len(stages) + 10, body, f"build worker-seconds for {len(stages)} stages")


def svg(panels: Sequence[Panel], width: int = WIDTH) -> str:
    """A standalone SVG document with ``panels`` stacked top to bottom."""
    height, groups = 0, []
    for panel in panels:
        groups.append(f'<g transform="translate(0,{height})">\n' + "\n".join(panel.body) + "\n</g>")
        height += panel.height
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(groups) + "\n</svg>\n")


def write_bundle_svg(manifest: Mapping, path: str) -> str:
    """Write the recall panel above the timings panel to the local file ``path`` (a temporary name, then
    renamed: a reader never sees half a picture). Returns a sentence saying what the file shows."""
    panels = [recall_panel(manifest)]
    k, curves, chosen = refine_curves(manifest)
    if curves:  # a tiered bundle: what re-scoring k x r candidates recovers, per refine factor r
        panels.append(recall_panel(manifest, curves=curves, chosen=chosen, key="r",
                                   what=f"recall@{k} after re-scoring the top {k} x r exactly"))
    panels.append(timings_panel(manifest))
    text = svg(panels)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return "; ".join(p.summary for p in panels)
