"""``report.html``: one page with a run's results, written into its trial folder.

Read from the trial folder (threestudio's layout, ``outputs/<name>/<tag>``):

* ``configs/parsed.yaml``: the prompts and ``data.image_path`` (the input image, copied next to the page);
* ``stages.json`` (``components/stage_records.py``): steps, wall time, median step time and peak VRAM per stage, and
  the test and export passes;
* ``csv_logs/version_*/metrics.csv`` (launch.py's CSVLogger): every ``train/loss*`` column, drawn as one SVG chart per
  term, coloured by stage (later versions, i.e. resumed runs, override earlier rows of the same step);
* ``save/it{N}-val.mp4`` and ``save/it{N}-test-*.mp4`` of the latest N (``.gif`` where imageio-ffmpeg was missing),
  linked relatively;
* ``save/it{N}-export/*.glb`` of the latest N, shown in a three.js viewer (play / pause, a time slider, orbit).

Written next to the page: ``report_files/`` with the vendored three.js bundle (``static/VENDOR.json`` records its
version and licence), the viewer script, the input image and ``mesh_glb.js`` (the ``.glb`` as base64, because a page
opened from disk may not fetch files). The trial folder is then self-contained: open ``report.html`` from disk or
serve the folder with any static server. Missing pieces are named on the page, never an error.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from animate124.core.io.atomic_io import save_with

__all__ = ["STATIC", "write_report", "read_loss_curves", "latest_outputs", "loss_chart_svg"]

STATIC = Path(__file__).resolve().parent / "static"
FILES = "report_files"
STAGE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
BACKGROUND = "#ffffff"


def write_report(trial_dir: str | os.PathLike, image_path: Optional[str | os.PathLike] = None) -> Path:
    """Write ``trial_dir/report.html`` and ``trial_dir/report_files/`` (module docstring). Returns the page's path.

    ``image_path``: the input image, when not found through ``configs/parsed.yaml``."""
    trial = Path(trial_dir)
    if not trial.is_dir():
        raise FileNotFoundError(f"{trial} is not a folder: pass a trial folder (outputs/<name>/<tag>)")
    files = trial / FILES
    files.mkdir(exist_ok=True)
    for name in ("three-viewer.min.js", "viewer.js", "THREE_LICENSE", "VENDOR.json"):
        shutil.copyfile(STATIC / name, files / name)
    config = _read_config(trial)
    stages = _read_json(trial / "stages.json")
    outputs = latest_outputs(trial / "save")
    image = _copy_input_image(trial, files, image_path or _get(config, "data", "image_path"))
    glb = outputs.get("glb")
    if glb is not None:
        encoded = base64.b64encode(glb.read_bytes()).decode("ascii")
        save_with(files / "mesh_glb.js", lambda p: Path(p).write_text(f'window.A124_GLB_BASE64 = "{encoded}";\n'))
    elif (files / "mesh_glb.js").exists():
        (files / "mesh_glb.js").unlink()  # a stale mesh of an earlier page would be shown as this run's
    curves = read_loss_curves(trial)
    page = _page(trial, config, stages, outputs, image, curves)
    path = trial / "report.html"
    save_with(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path


def latest_outputs(save_dir: Path) -> dict:
    """The latest step's validation video, test videos and exported ``.glb`` under ``save_dir`` (those that exist):
    ``{"val": Path, "val_step": N, "tests": [Path], "test_step": N, "glb": Path, "export_step": N}``."""
    found: dict = {}
    if not save_dir.is_dir():
        return found
    names = os.listdir(save_dir)

    def latest(pattern: str) -> tuple[Optional[int], list[str]]:
        hits = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(pattern, n))]
        if not hits:
            return None, []
        step = max(s for s, _ in hits)
        return step, sorted(n for s, n in hits if s == step)

    step, val = latest(r"it(\d+)-val\.(?:mp4|gif)")
    if val:
        found.update(val=save_dir / val[0], val_step=step)
    step, tests = latest(r"it(\d+)-test-.+\.(?:mp4|gif)")
    if tests:
        found.update(tests=[save_dir / n for n in tests], test_step=step)
    exports = [(int(m.group(1)), n) for n in names if (m := re.fullmatch(r"it(\d+)-export", n))]
    for step, name in sorted(exports, reverse=True):
        glbs = sorted((save_dir / name).glob("*.glb"))
        if glbs:
            found.update(glb=glbs[0], export_step=step)
            break
    return found


def read_loss_curves(trial: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` for every ``train/loss*`` column of the trial's CSV logs, sorted by step."""
    curves: dict[str, dict[int, float]] = {}
    versions = sorted((trial / "csv_logs").glob("version_*/metrics.csv"), key=lambda p: _version(p.parent.name))
    for path in versions:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key and key.startswith("train/loss") and value not in ("", None):
                        try:
                            curves.setdefault(key, {})[int(float(step))] = float(value)
                        except ValueError:
                            continue
    return {key: sorted(values.items()) for key, values in sorted(curves.items())}


def loss_chart_svg(title: str, points: list[tuple[int, float]], stages: list[tuple[str, int]], width: int = 460,
                   height: int = 200, max_points: int = 800) -> str:
    """One inline SVG line chart: ``points`` (step, value), each stage's part in its own colour, stage starts dashed.
    ``stages``: [(name, start step)] in order. More than ``max_points`` points are averaged in equal step bins."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        return f'<figure class="chart"><figcaption>{html.escape(title)}: no finite values</figcaption></figure>'
    finite = _bin(finite, max_points)
    left, right, top, bottom = 56, 8, 8, 22
    s0, s1 = finite[0][0], max(finite[-1][0], finite[0][0] + 1)
    values = [v for _, v in finite]
    v0, v1 = min(values), max(values)
    if v1 - v0 < 1e-12:
        v0, v1 = v0 - 0.5, v1 + 0.5

    def xy(step: float, value: float) -> str:
        x = left + (width - left - right) * (step - s0) / (s1 - s0)
        y = top + (height - top - bottom) * (1 - (value - v0) / (v1 - v0))
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#bbb"/>']
    starts = [s for _, s in stages]
    for index, (name, start) in enumerate(stages):
        end = starts[index + 1] if index + 1 < len(starts) else math.inf
        colour = STAGE_COLOURS[index % len(STAGE_COLOURS)]
        segment = [(s, v) for s, v in finite if start <= s < end]
        if start > s0 and start <= s1:
            x = xy(start, v1).split(",")[0]
            parts.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{height - bottom}" stroke="#999" '
                         'stroke-dasharray="4 3"/>')
        if segment:
            parts.append(f'<polyline data-stage="{html.escape(name)}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.3" points="{" ".join(xy(s, v) for s, v in segment)}"/>')
    if not stages:
        parts.append(f'<polyline fill="none" stroke="{STAGE_COLOURS[0]}" stroke-width="1.3" '
                     f'points="{" ".join(xy(s, v) for s, v in finite)}"/>')
    parts += [f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" font-size="10">{_num(v1)}</text>',
              f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end" font-size="10">{_num(v0)}</text>',
              f'<text x="{left}" y="{height - 6}" font-size="10">step {s0}</text>',
              f'<text x="{width - right}" y="{height - 6}" text-anchor="end" font-size="10">{s1}</text></svg>']
    return f'<figure class="chart">{"".join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>'


# ----------------------------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 4px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .chart { margin: 0; } figcaption { font-size: 0.85em; }
.videos { display: flex; flex-wrap: wrap; gap: 12px; } .videos figure { margin: 0; }
video, .videos img { width: 256px; height: 256px; background: #fff; border: 1px solid #ddd; }
#viewer { width: 660px; } #viewer-canvas { width: 640px; height: 480px; border: 1px solid #ddd; display: block; }
.controls { display: flex; gap: 10px; align-items: center; margin-top: 6px; }
#viewer-time { width: 380px; } #viewer-label { white-space: nowrap; font-size: 0.9em; } .note { color: #777; } .legend span { margin-right: 12px; }
"""


def _page(trial: Path, config: dict, stages: Optional[dict], outputs: dict, image: Optional[str],
          curves: dict) -> str:
    e = html.escape
    title = f"{trial.parent.name}/{trial.name}"
    prompt, motion = _get(config, "system", "prompt"), _get(config, "system", "motion_prompt")
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>Animate124: {e(title)}</title>',
           f"<style>{_STYLE}</style></head><body>", f"<h1>Animate124 results: {e(title)}</h1>"]
    if prompt or motion:
        out.append(f"<p>Prompt: <b>{e(str(prompt or ''))}</b><br>Motion: <b>{e(str(motion or ''))}</b></p>")
    out.append("<h2>Input image</h2>")
    out.append(f'<img id="input-image" src="{FILES}/{e(image)}" alt="input image" style="max-width:256px">'
               if image else '<p class="note">No input image found (configs/parsed.yaml: data.image_path).</p>')
    out += ["<h2>Stages</h2>", _stage_table(stages)]
    out += ["<h2>Losses</h2>", _charts(curves, stages)]
    out += ["<h2>Videos</h2>", _videos(trial, outputs)]
    out += ["<h2>Animated mesh</h2>", _viewer(outputs)]
    out.append(f'<p class="note">three.js {e(_vendor_version())} (MIT), vendored in {FILES}/.</p></body></html>')
    return "\n".join(out) + "\n"


def _stage_table(stages: Optional[dict]) -> str:
    if not stages:
        return '<p class="note">No stages.json yet (written when training ends).</p>'
    rows = ['<table id="stage-table"><tr><th>stage</th><th>steps</th><th>wall time</th><th>median step</th>'
            "<th>peak VRAM</th></tr>"]
    for record in stages.get("stages", []):
        rows.append(_row(record["stage"], record.get("steps"), record.get("wall_time_s"), record.get("median_step_s"),
                         record.get("peak_vram_gb")))
    for name in ("test", "export"):
        record = stages.get(name)
        if record:
            rows.append(_row(name, record.get("batches"), record.get("wall_time_s"), None, record.get("peak_vram_gb"),
                             unit="batches"))
    rows.append("</table>")
    return "".join(rows)


def _row(name, steps, wall, median, vram, unit: str = "") -> str:
    cells = [html.escape(str(name)), "-" if steps is None else f"{steps}{' ' + unit if unit else ''}",
             "-" if wall is None else _duration(wall), "-" if median is None else f"{median * 1000:.1f} ms",
             "-" if vram is None else f"{vram:.2f} GiB"]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _charts(curves: dict, stages: Optional[dict]) -> str:
    if not curves:
        return '<p class="note">No train/loss* columns in csv_logs/version_*/metrics.csv.</p>'
    bounds = _stage_bounds(stages)
    legend = "".join(f'<span style="color:{STAGE_COLOURS[i % len(STAGE_COLOURS)]}">&#9632; {html.escape(n)}</span>'
                     for i, (n, _) in enumerate(bounds))
    charts = "".join(loss_chart_svg(name.removeprefix("train/"), points, bounds) for name, points in curves.items())
    return f'<p class="legend">{legend}</p><div class="charts" id="loss-charts">{charts}</div>'


def _videos(trial: Path, outputs: dict) -> str:
    items = []
    if "val" in outputs:
        items.append(("validation", outputs["val"]))
    for path in outputs.get("tests", []):
        items.append((re.sub(r"^it\d+-test-", "test: ", path.stem), path))
    if not items:
        return '<p class="note">No validation or test videos in save/ yet.</p>'
    figures = []
    for caption, path in items:
        src = html.escape(path.relative_to(trial).as_posix())
        media = (f'<video src="{src}" controls muted loop playsinline preload="auto"></video>'
                 if path.suffix == ".mp4" else f'<img src="{src}" alt="{html.escape(caption)}">')
        figures.append(f"<figure>{media}<figcaption>{html.escape(caption)} ({html.escape(path.name)})"
                       "</figcaption></figure>")
    return f'<div class="videos">{"".join(figures)}</div>'


def _viewer(outputs: dict) -> str:
    if "glb" not in outputs:
        return '<p class="note">No exported .glb in save/it*-export/ yet (run with --export).</p>'
    glb = outputs["glb"]
    return (f'<div id="viewer"><p>{html.escape(glb.parent.name + "/" + glb.name)}: drag to orbit, scroll to zoom.</p>'
            f'<canvas id="viewer-canvas" width="640" height="480" data-background="{BACKGROUND}" '
            'data-autoplay="true"></canvas>'
            '<div class="controls"><button id="viewer-play" type="button">Pause</button>'
            '<input id="viewer-time" type="range" min="0" max="1" step="0.001" value="0" aria-label="time">'
            '<span id="viewer-label"></span></div><p id="viewer-status" class="note">Loading the mesh...</p></div>'
            f'<script src="{FILES}/three-viewer.min.js"></script><script src="{FILES}/mesh_glb.js"></script>'
            f'<script src="{FILES}/viewer.js"></script>')


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _read_config(trial: Path) -> dict:
    path = trial / "configs" / "parsed.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(config: dict, *keys):
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _copy_input_image(trial: Path, files: Path, image_path) -> Optional[str]:
    if not image_path:
        return None
    candidates = [Path(image_path)] if Path(image_path).is_absolute() else [Path.cwd() / image_path, trial / image_path]
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        return None
    name = "input" + source.suffix.lower()
    shutil.copyfile(source, files / name)
    return name


def _stage_bounds(stages: Optional[dict]) -> list[tuple[str, int]]:
    if not stages:
        return []
    names = [r["stage"] for r in stages.get("stages", [])]
    starts = stages.get("stage_starts") or [r["start_step"] for r in stages.get("stages", [])]
    return list(zip(names, starts))


def _bin(points: list[tuple[int, float]], n: int) -> list[tuple[int, float]]:
    if len(points) <= n:
        return points
    size = math.ceil(len(points) / n)
    return [(points[i][0], sum(v for _, v in points[i : i + size]) / len(points[i : i + size]))
            for i in range(0, len(points), size)]


def _version(name: str) -> int:
    digits = name.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def _num(value: float) -> str:
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


def _vendor_version() -> str:
    return str((_read_json(STATIC / "VENDOR.json") or {}).get("version", "?"))
