"""``densebeam inspect BUNDLE --plot FILE``: the SVG of a real bundle's manifest is well-formed XML, draws
one curve per measured k whose points are the manifest's (x a function of nprobe, y an affine, falling
function of recall), marks each k's chosen nprobe on its curve, draws the build's stages, and copes with
manifests that lack per-k curves or timings."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts import versions
from densebeam.index_store.artifacts.bundle_plot import recall_panel, svg, timings_panel
from densebeam.index_store.types import ModelFacts
from densebeam.pipelines import build_index, cli
from test_build_index import clustered, write_embeddings_dir

SVG = "{http://www.w3.org/2000/svg}"
FACTS = ModelFacts(model="synthetic", revision=None, dim=32, similarity="cos", dtype="float32")


@pytest.fixture(scope="module")
def location(tmp_path_factory) -> str:
    """A versioned location holding one real build of 800 vectors, recall measured at 3 k. 400 clusters
    in 16 lists: neighbours spread over lists, so every curve climbs (0.2-0.6 at nprobe 1, 1.0 at 16)."""
    tmp = tmp_path_factory.mktemp("plot")
    emb_dir = write_embeddings_dir(tmp / "emb", clustered(800, clusters=400), FACTS, 400)
    root = str(tmp / "idx")
    build_index.run(["--embeddings", emb_dir, "--output", root, "--versioned", "--nlist", "16",
                     "--k", "5,20,100", "--runner", "local"])
    return root


def _plot(capsys, path: str, out) -> tuple[ET.Element, str]:
    rc = cli.main(["inspect", path, "--plot", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    return ET.parse(out).getroot(), stdout


def _points(polyline: ET.Element) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in polyline.get("points").split()]


def _check_curves(root: ET.Element, curves: dict, chosen: dict, target: float | None) -> None:
    """Every curve and marker sits where the manifest's numbers put it, on one shared pair of axes."""
    lines = {int(p.get("data-k")): p for p in root.iter(f"{SVG}polyline")}
    assert sorted(lines) == sorted(curves), "one polyline per measured k"
    x_of, recalls, ys = {}, [], []
    for k, curve in curves.items():
        pts = _points(lines[k])
        assert len(pts) == len(curve)
        for (x, y), c in zip(pts, curve):
            assert x_of.setdefault(c["nprobe"], x) == pytest.approx(x, abs=0.11), "x depends on nprobe alone"
            recalls.append(c["recall"])
            ys.append(y)
    nprobes = sorted(x_of)
    assert all(x_of[a] < x_of[b] for a, b in zip(nprobes, nprobes[1:])), "x increases with nprobe"
    # y = a + b * recall for every point of every curve (to the 0.1 the coordinates are rounded to), b < 0.
    b, a = np.polyfit(recalls, ys, 1)
    assert b < 0 and np.abs(a + b * np.array(recalls) - ys).max() < 0.11
    for (r1, y1), (r2, y2) in zip(sorted(zip(recalls, ys)), sorted(zip(recalls, ys))[1:]):
        assert y2 <= y1 + 0.1 and (r2 == r1 or y2 < y1), "a higher recall is drawn higher"
    marks = {int(c.get("data-k")): c for c in root.iter(f"{SVG}circle") if c.get("class") == "chosen"}
    assert sorted(marks) == sorted(chosen), "one chosen-nprobe marker per k"
    for k, c in chosen.items():
        mark = marks[k]
        assert int(mark.get("data-nprobe")) == c["nprobe"]
        assert float(mark.get("cx")) == pytest.approx(x_of[c["nprobe"]], abs=0.11)
        assert float(mark.get("cy")) == pytest.approx(a + b * c["recall"], abs=0.11)
        assert f"nprobe {c['nprobe']}" in "".join(mark.itertext())
    if target is not None:
        dashed = [float(ln.get("y1")) for ln in root.iter(f"{SVG}line") if ln.get("stroke-dasharray") == "4 3"
                  and ln.get("y1") == ln.get("y2")]
        assert any(y == pytest.approx(a + b * target, abs=0.11) for y in dashed), "the target recall line"


def test_inspect_plot_draws_every_k_its_chosen_nprobe_and_the_stages(location, tmp_path, capsys):
    m = bundle_lib.read_manifest(location)
    assert sorted(map(int, m["recall_curves"])) == [5, 20, 100] and m["timings"]
    assert all(len({c["recall"] for c in curve}) >= 3 for curve in m["recall_curves"].values()), "flat curves"
    root, stdout = _plot(capsys, location, tmp_path / "a.svg")
    assert "recall@k against nprobe for k = 5, 20, 100" in stdout and "build worker-seconds" in stdout
    curves = {int(k): v for k, v in m["recall_curves"].items()}
    chosen = {int(k): v for k, v in m["nprobe_by_k"].items()}
    _check_curves(root, curves, chosen, m["target_recall"])
    # One bar per recorded stage, as long as its worker-seconds.
    bars = {r.get("data-stage"): float(r.get("width")) for r in root.iter(f"{SVG}rect") if r.get("data-stage")}
    assert set(bars) == set(m["timings"])
    longest = max(m["timings"], key=lambda s: m["timings"][s]["seconds"])
    for stage, t in m["timings"].items():
        assert bars[stage] == pytest.approx(bars[longest] * t["seconds"] / m["timings"][longest]["seconds"], abs=0.11)
    # The versioned location and its current version's directory draw the same picture.
    version = versions.resolve(location)
    assert version != location
    _plot(capsys, version, tmp_path / "b.svg")
    assert (tmp_path / "b.svg").read_bytes() == (tmp_path / "a.svg").read_bytes()


def test_inspect_plot_of_manifests_without_timings_or_per_k_curves(location, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(versions.resolve(location), bundle)
    manifest_path = bundle / bundle_lib.MANIFEST
    m = json.loads(manifest_path.read_text())
    del m["timings"]
    manifest_path.write_text(json.dumps(m))
    root, stdout = _plot(capsys, str(bundle), tmp_path / "no-timings.svg")
    assert "no build timings in the manifest" in stdout
    assert "records no build timings" in "".join(root.itertext())
    assert not [r for r in root.iter(f"{SVG}rect") if r.get("data-stage")]
    _check_curves(root, {int(k): v for k, v in m["recall_curves"].items()},
                  {int(k): v for k, v in m["nprobe_by_k"].items()}, m["target_recall"])
    # A bundle from before per-k curves: its one curve at its k, its one nprobe marked.
    for key in ("recall_curves", "nprobe_by_k", "recall_ks"):
        del m[key]
    manifest_path.write_text(json.dumps(m))
    root, stdout = _plot(capsys, str(bundle), tmp_path / "old.svg")
    assert f"for k = {m['k']} (chosen nprobe {m['k']}: {m['nprobe']})" in stdout
    _check_curves(root, {m["k"]: m["recall_curve"]}, {m["k"]: {"nprobe": m["nprobe"], "recall": m["recall_at_k"]}},
                  m["target_recall"])


def test_a_manifest_without_any_curve_says_so_in_the_picture():
    m = {"factory": "IVF8,Flat", "counts": {"vectors": 100}}
    root = ET.fromstring(svg([recall_panel(m), timings_panel(m)]))
    text = "".join(root.itertext())
    assert "records no recall curve" in text and "records no build timings" in text
    assert not list(root.iter(f"{SVG}polyline"))


def test_inspect_plot_refuses_damaged_curves_and_embeddings_dirs(location, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(versions.resolve(location), bundle)
    m = json.loads((bundle / bundle_lib.MANIFEST).read_text())
    m["recall_curves"]["20"][1]["recall"] = "high"
    (bundle / bundle_lib.MANIFEST).write_text(json.dumps(m))
    assert cli.main(["inspect", str(bundle), "--plot", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert "recall_curves[20][1]" in err and "rebuild the bundle" in err
    assert not list(tmp_path.glob("x.svg*")), "no picture, not even a temporary one"
    emb_dir = write_embeddings_dir(tmp_path / "emb", clustered(10), FACTS, 10)
    assert cli.main(["inspect", emb_dir, "--plot", str(tmp_path / "y.svg")]) == 2
    assert "embeddings dir" in capsys.readouterr().err


def test_inspect_json_with_plot_keeps_stdout_json(location, tmp_path, capsys):
    assert cli.main(["inspect", location, "--json", "--plot", str(tmp_path / "j.svg")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["recall_curves"] and "plot:" in captured.err
    ET.parse(tmp_path / "j.svg")
