"""Load a real threestudio checkout and this extension the way ``launch.py`` does (integration tier only).

Where threestudio comes from, first found wins: ``$THREESTUDIO_ROOT``; ``.deps/threestudio`` beside the repo (a
git-ignored checkout, see README); a ``threestudio`` package already importable from ``PYTHONPATH``.
Where threestudio's import-time-only dependencies are missing (``tinycudann``, ``nvdiffrast``, and on a bare GPU
image also ``wandb``, ``controlnet_aux``, ``igl``, ``IPython``), import stand-ins from ``tests/stubs`` are appended to
``sys.path`` (appended, so real installs win). Our components never call them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "threestudio-animate124"
STUBS = REPO / "tests" / "stubs"
# import-time dependencies of threestudio that our code never calls; stand-ins live in tests/stubs
STUBBED = ("tinycudann", "nvdiffrast", "wandb", "controlnet_aux", "igl", "IPython")


def threestudio_root() -> Path | None:
    """The threestudio checkout to test against, or None when there is none."""
    env = os.environ.get("THREESTUDIO_ROOT")
    if env:
        return Path(env).resolve() if (Path(env) / "launch.py").is_file() else None
    local = REPO / ".deps" / "threestudio"
    if (local / "launch.py").is_file():
        return local
    spec = importlib.util.find_spec("threestudio")
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).resolve().parents[1]
        if (root / "launch.py").is_file():
            return root
    return None


def why_unavailable() -> str | None:
    """A one-line reason the integration tier cannot run here, or None when it can."""
    if threestudio_root() is None:
        return (
            "no threestudio checkout: set THREESTUDIO_ROOT or put one in .deps/threestudio "
            "(see README, 'Integration tests')"
        )
    for name in ("pytorch_lightning", "cv2", "envlight", "torchmetrics", "diffusers", "nerfacc"):
        if importlib.util.find_spec(name) is None:
            return f"threestudio's import-time dependency '{name}' is not installed (pip install -e '.[integration]')"
    return None


def _link_extension(root: Path) -> Path:
    """Make ``custom/threestudio-animate124`` in the checkout point at this repo (never replaces a real folder)."""
    target = root / "custom" / EXTENSION_NAME
    if target.is_symlink() and target.resolve() != REPO:
        target.unlink()
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(REPO, target_is_directory=True)
    if target.resolve() != REPO:
        raise RuntimeError(f"{target} is another copy of the extension; remove it or set THREESTUDIO_ROOT elsewhere")
    return target


_loaded: ModuleType | None = None


@contextlib.contextmanager
def _chdir(path: Path):
    # launch.py lists custom/ relative to the working directory (contextlib.chdir needs Python 3.11)
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def load_threestudio() -> ModuleType:
    """Import threestudio, load the extension through launch.py's loader, and run the host on CPU if needed."""
    global _loaded
    if _loaded is not None:
        return _loaded
    root = threestudio_root()
    assert root is not None, why_unavailable()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # appended, so a real install earlier on sys.path always wins over the stand-in
    if any(importlib.util.find_spec(name) is None for name in STUBBED) and str(STUBS) not in sys.path:
        sys.path.append(str(STUBS))
    import threestudio

    _link_extension(root)
    spec = importlib.util.spec_from_file_location("threestudio_launch", root / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    with _chdir(root):
        ok = launch.load_custom_module(os.path.join("custom", EXTENSION_NAME))
    if not ok:
        raise RuntimeError("launch.py's loader reported IMPORT FAILED for the extension (traceback above)")
    _use_cpu_if_no_cuda()
    _loaded = threestudio
    return threestudio


def _use_cpu_if_no_cuda() -> None:
    """threestudio fixes every component on cuda:<rank>; point its get_device at the CPU in every module."""
    import torch

    if torch.cuda.is_available():
        return
    import threestudio.utils.misc as misc

    original = getattr(misc, "_a124_original_get_device", misc.get_device)
    misc._a124_original_get_device = original

    def get_device():
        return torch.device("cpu")

    for module in list(sys.modules.values()):
        if module is not None and vars(module).get("get_device") is original:  # vars: stand-ins raise on getattr
            module.get_device = get_device
