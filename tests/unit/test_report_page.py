"""report.html on a trial folder of the synthetic scene (animate124/testing/report_trial.py): what the page holds,
then the page in headless Chromium (tests/web/check_report.mjs): the model loads, the object is visible, two slider
times show different shapes, the videos play, no console errors; opened from disk and from a static server."""
import base64
import functools
import http.server
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from animate124.core.report.page import STATIC, latest_outputs, loss_chart_svg, write_report
from animate124.testing.report_trial import STAGES, STEP, loss_value, write_synthetic_trial

REPO = Path(__file__).resolve().parents[2]
BACKGROUND = np.array([255, 255, 255])


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    folder = write_synthetic_trial(tmp_path_factory.mktemp("outputs") / "synthetic" / "run")
    write_report(folder)
    return folder


def test_page_holds_stage_table_losses_videos_image_and_inlined_mesh(trial):
    page = (trial / "report.html").read_text()
    # stage table: one row per stage with its numbers, then the test and export passes
    table = re.search(r'<table id="stage-table">(.*?)</table>', page).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows[1:]]
    assert cells == [
        ["static", "40", "0:01:36", "512.0 ms", "7.25 GiB"],
        ["dynamic", "50", "0:40:00", "1250.0 ms", "18.50 GiB"],
        ["refine", "30", "1:06:40", "2500.0 ms", "20.25 GiB"],
        ["test", "48 batches", "0:01:01", "-", "3.50 GiB"],
        ["export", "1 batches", "12.5 s", "-", "2.00 GiB"],
    ]
    assert [c[0] for c in cells[:3]] == [s[0] for s in STAGES]
    # one chart per logged loss term, one polyline per stage
    charts = re.findall(r'<figure class="chart">(.*?)</figure>', page)
    assert [re.search(r"<figcaption>(.*?)</figcaption>", c).group(1) for c in charts] == [
        "loss", "loss_rgb", "loss_video:loss_sds"]
    for chart in charts:
        assert re.findall(r'data-stage="(\w+)"', chart) == ["static", "dynamic", "refine"]
    # videos linked relatively, files present; the input image copied next to the page
    videos = re.findall(r'<video src="([^"]+)"', page)
    assert videos == [f"save/it{STEP}-val.mp4", f"save/it{STEP}-test-front-over-time.mp4"]
    assert all((trial / v).is_file() for v in videos)
    assert '<img id="input-image" src="report_files/input.png"' in page
    assert (trial / "report_files" / "input.png").read_bytes() == (trial / "input" / "rgba.png").read_bytes()
    # the .glb inlined as base64 (a page from disk cannot fetch it), byte for byte
    js = (trial / "report_files" / "mesh_glb.js").read_text()
    encoded = re.fullmatch(r'window.A124_GLB_BASE64 = "([A-Za-z0-9+/=]+)";\n', js).group(1)
    assert base64.b64decode(encoded) == (trial / "save" / f"it{STEP}-export" / "mesh.glb").read_bytes()
    # scripts: only files of the folder, no network
    assert re.findall(r'<script src="([^"]+)"', page) == [
        "report_files/three-viewer.min.js", "report_files/mesh_glb.js", "report_files/viewer.js"]
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_loss_chart_points_are_the_logged_values():
    points = [(s, loss_value("loss_rgb", s)) for s in range(STEP)]
    svg = loss_chart_svg("loss_rgb", points, [("static", 0), ("dynamic", 40), ("refine", 90)])
    lines = re.findall(r'data-stage="(\w+)"[^>]*points="([^"]+)"', svg)
    assert [name for name, _ in lines] == ["static", "dynamic", "refine"]
    xy = [tuple(map(float, p.split(","))) for _, pts in lines for p in pts.split()]
    assert len(xy) == STEP
    # x: 56 + 396 * step / 119; y: 8 + 170 * (1 - (v - min) / (max - min))
    values = [v for _, v in points]
    lo, hi = min(values), max(values)
    for (x, y), (step, value) in zip(xy, points):
        assert x == pytest.approx(56 + 396 * step / 119, abs=0.06)
        assert y == pytest.approx(8 + 170 * (1 - (value - lo) / (hi - lo)), abs=0.06)
    # long runs are averaged into at most max_points bins
    many = loss_chart_svg("x", [(s, float(s)) for s in range(10000)], [], max_points=100)
    assert len(re.search(r'points="([^"]+)"', many).group(1).split()) == 100


def test_latest_outputs_and_missing_pieces(tmp_path):
    save = tmp_path / "save"
    (save / "it10-export").mkdir(parents=True)
    (save / "it200-export").mkdir()
    (save / "it10-export" / "mesh.glb").write_bytes(b"old")
    for name in ("it5-val.mp4", "it15-val.mp4", "it15-test-orbit.mp4", "it3-test-orbit.mp4", "it15-test-a.gif"):
        (save / name).write_bytes(b"")
    found = latest_outputs(save)
    assert (found["val"].name, found["val_step"]) == ("it15-val.mp4", 15)
    assert [p.name for p in found["tests"]] == ["it15-test-a.gif", "it15-test-orbit.mp4"]
    assert (found["glb"].name, found["export_step"]) == ("mesh.glb", 10)  # it200-export holds no .glb
    # a folder with nothing yet: a page that names what is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    for note in ("No stages.json yet", "No train/loss* columns", "No validation or test videos",
                 "No exported .glb", "No input image found"):
        assert note in page
    assert not (empty / "report_files" / "mesh_glb.js").exists()


def test_report_command(trial, tmp_path, capsys):
    from animate124.tools.cli import main

    (trial / "report.html").unlink()
    assert main(["report", str(trial)]) == 0
    assert capsys.readouterr().out.strip() == str(trial / "report.html") and (trial / "report.html").is_file()
    # not a trial folder / a missing image: one line naming the fix, nothing written
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "is not a folder: pass a trial folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 1
    assert "holds neither save/ nor stages.json" in capsys.readouterr().err
    assert main(["report", str(trial), "--image", str(tmp_path / "x.png")]) == 1
    assert "--image" in capsys.readouterr().err and not (tmp_path / "report.html").exists()


def test_vendored_three_is_the_locked_version_with_its_licence():
    vendor = json.loads((STATIC / "VENDOR.json").read_text())
    lock = json.loads((REPO / "tests" / "web" / "package-lock.json").read_text())
    assert vendor["version"] == lock["packages"]["node_modules/three"]["version"]
    assert vendor["license"] == "MIT" and "MIT License" in (STATIC / "THREE_LICENSE").read_text()
    bundle = (STATIC / "three-viewer.min.js").read_text()
    assert "SPDX-License-Identifier: MIT" in bundle and bundle.startswith("var A124Three=")
    assert "import " not in bundle[:200]  # a classic script: pages opened from disk cannot load ES modules


def _foreground(path: Path) -> np.ndarray:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)[2:-2, 2:-2]  # inside the canvas border
    return np.abs(image - BACKGROUND).max(-1) > 24


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _serve(folder: Path):
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.timeout(600)
@pytest.mark.parametrize("opened", ["from disk", "from a static server"])
def test_page_in_headless_chromium(trial, tmp_path, opened):
    from web_tools import check_page

    server = _serve(trial) if opened == "from a static server" else None
    try:
        page = f"http://127.0.0.1:{server.server_port}/report.html" if server else trial / "report.html"
        result = check_page(page, tmp_path, [0.0, 1.0])
    finally:
        if server:
            server.shutdown()
    assert result["console_errors"] == [] and result["page_errors"] == [] and result["failed_requests"] == []
    viewer = result["viewer"]
    assert viewer["ready"] and viewer["error"] is None
    assert viewer["duration"] == pytest.approx(63 / 16) and viewer["frames"] == 6
    # the object is drawn: a solid share of the canvas differs from the background, and the canvas is not blank
    masks = [_foreground(s["path"]) for s in result["screenshots"]]
    for shot, mask in zip(result["screenshots"], masks):
        assert 0.02 < mask.mean() < 0.6, (shot, mask.mean())
        assert not shot["playing"]  # moving the slider pauses
    assert [s["label"].split()[:3] for s in result["screenshots"]] == [["t", "=", "0.000"], ["t", "=", "1.000"]]
    # two times, two shapes: the sphere crossed the scene (intersection over union of the silhouettes well below 1)
    iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
    assert iou < 0.8, iou
    # the videos play and the input image shows
    assert len(result["videos"]) == 2
    for video in result["videos"]:
        assert video.get("played") and video["error"] is None and video["width"] == 64, video
    assert result["images"] == [{"src": "report_files/input.png", "loaded": True}]
