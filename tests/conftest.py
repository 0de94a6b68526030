"""Shared fixtures and the tier guards (unit / integration / gpu).

Tiers are chosen by folder: tests/unit needs neither threestudio nor CUDA; tests/integration loads a real
threestudio checkout (skipped with a printed reason when absent); tests/gpu needs CUDA.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED_DATA = Path(os.environ.get("A124_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO / "benchmarks"))  # the step benchmark (step_benchmark) and the benchmark scripts

from threestudio_env import why_unavailable  # noqa: E402

_SKIPS: dict[str, str] = {}
_COUNTS: dict[str, int] = {"unit": 0, "integration": 0, "gpu": 0}


def pytest_collection_modifyitems(config, items):
    import torch

    cuda = torch.cuda.is_available()
    ts_reason = why_unavailable()
    for item in items:
        path = Path(str(item.fspath))
        tier = "integration" if "integration" in path.parts else "gpu" if "gpu" in path.parts else "unit"
        _COUNTS[tier] += 1
        if tier == "integration":
            item.add_marker(pytest.mark.integration)
            if ts_reason:
                item.add_marker(pytest.mark.skip(reason=f"integration tier skipped: {ts_reason}"))
                _SKIPS["integration"] = ts_reason
        elif tier == "gpu":
            item.add_marker(pytest.mark.gpu)
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu tier skipped: torch.cuda.is_available() is False"))
                _SKIPS["gpu"] = "torch.cuda.is_available() is False"
        else:
            item.add_marker(pytest.mark.unit)


def pytest_terminal_summary(terminalreporter):
    tiers = {tier: f"{n} tests selected" if n else "no tests selected" for tier, n in _COUNTS.items()}
    for tier, reason in _SKIPS.items():
        tiers[tier] = f"skipped: {reason}"
    terminalreporter.write_sep("-", "test tiers")
    for tier, state in tiers.items():
        terminalreporter.write_line(f"{tier}: {state}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repo (the benchmark and the five preprocessed examples)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def example_rgba(tmp_path_factory) -> Path:
    """The panda example's rgba.png from ../shared/data or, without it (a user's checkout), a generated cut-out RGBA
    image of the same kind, so the integration tier runs anywhere; tests pinned to the panda use ``shared_data``."""
    path = SHARED_DATA / "examples" / "panda-dance" / "rgba.png"
    if path.is_file():
        return path
    from animate124.testing.smoke_assets import write_smoke_image

    out = tmp_path_factory.mktemp("example") / "rgba.png"
    write_smoke_image(str(out), size=256)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random diffusion/CLIP models in the real folder layouts, made once per test run."""
    from animate124.testing.tiny_models import make_tiny_models

    cache = os.environ.get("A124_TINY_MODELS")  # reuse across runs when set
    out = Path(cache) if cache else tmp_path_factory.mktemp("tiny-models")
    return make_tiny_models(out)


@pytest.fixture(scope="session")
def threestudio():
    """The real threestudio with this extension loaded through launch.py's custom-module loader."""
    from threestudio_env import load_threestudio

    return load_threestudio()
