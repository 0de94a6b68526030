"""The real consumers of our exports, run from tests: the Khronos glTF validator and headless Chromium (node scripts
in tests/web, their npm packages installed by ``npm ci`` there). Missing tools skip the test with the reason, unless
``A124_REQUIRE_WEB=1`` (set by .ci/run after installing them), where they fail it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parent / "web"
CHROMIUM = os.environ.get("A124_CHROMIUM", "/usr/bin/chromium")


def _missing(reason: str) -> None:
    if os.environ.get("A124_REQUIRE_WEB") == "1":
        pytest.fail(f"A124_REQUIRE_WEB=1 but {reason}")
    pytest.skip(reason)


def require_node_package(name: str) -> str:
    """The node executable, after checking that tests/web has ``name`` installed; skips (or fails) otherwise."""
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed (apt-get install -y nodejs npm)")
    if not (WEB / "node_modules" / name / "package.json").is_file():
        _missing(f"the npm package {name} is not installed in tests/web (cd tests/web && npm ci --omit=dev)")
    return node


def require_chromium() -> str:
    node = require_node_package("puppeteer-core")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    return node


def validate_gltf(path: str | os.PathLike) -> dict:
    """The Khronos validator's report on ``path`` (issues.numErrors / numWarnings / messages, info)."""
    node = require_node_package("gltf-validator")
    out = subprocess.run([node, str(WEB / "validate_gltf.mjs"), str(path)], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout)


def check_page(page: str | os.PathLike, out_dir: str | os.PathLike, times: list[float], timeout_s: int = 240) -> dict:
    """Open ``page`` (a path or URL) in headless Chromium with tests/web/check_report.mjs: screenshots of the viewer
    at each slider time (``out_dir/viewer_t{t}.png``), the videos' play state and the console errors, as JSON."""
    node = require_chromium()
    out = subprocess.run([node, str(WEB / "check_report.mjs"), str(page), str(out_dir), json.dumps(times)],
                         capture_output=True, text=True, timeout=timeout_s,
                         env={**os.environ, "A124_CHROMIUM": CHROMIUM})
    if out.returncode != 0:
        raise AssertionError(f"check_report.mjs failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)
