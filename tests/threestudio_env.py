"""Which threestudio the integration tier runs against, and loading it (the work is in animate124.tools.host).

Where threestudio comes from, first found wins:
1. ``$THREESTUDIO_ROOT`` (a checkout holding launch.py);
2. the checkout this repo is installed in, as users install it (``threestudio/custom/threestudio-animate124``);
3. ``.deps/threestudio`` beside the repo (a git-ignored checkout);
4. ``../shared/vendor/threestudio`` (threestudio 28d9d80, code only, read-only; CI uses it): copied once to a
   temporary folder, because the extension must be linked into its ``custom/``;
5. a ``threestudio`` package already importable from ``PYTHONPATH``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VENDORED = REPO.parent / "shared" / "vendor" / "threestudio"
# threestudio's own import-time dependencies that are on PyPI (the rest have stand-ins, see animate124.tools.host)
HOST_IMPORTS = {"pytorch_lightning": "pytorch-lightning", "cv2": "opencv-python-headless", "envlight": "envlight",
                "torchmetrics": "torchmetrics", "diffusers": "diffusers", "nerfacc": "nerfacc",
                "omegaconf": "omegaconf", "typeguard": "typeguard", "matplotlib": "matplotlib", "trimesh": "trimesh",
                "einops": "einops", "scipy": "scipy"}


def _vendored_copy() -> Path | None:
    if not (VENDORED / "launch.py").is_file():
        return None
    # one copy per repo checkout: the copy's custom/ links to this checkout
    key = hashlib.sha1(f"{VENDORED.resolve()}|{REPO}".encode()).hexdigest()[:8]
    dest = Path(tempfile.gettempdir()) / f"a124-threestudio-{key}"
    if not (dest / "launch.py").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        shutil.copytree(VENDORED, tmp / "ts", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        for path in (tmp / "ts").rglob("*"):  # the vendored copy is read-only; the copy must take custom/ links
            path.chmod(path.stat().st_mode | 0o200)
        (tmp / "ts").chmod(0o755)
        try:
            (tmp / "ts").rename(dest)  # atomic: parallel test processes never see half a copy
        except OSError:
            pass  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def threestudio_root() -> Path | None:
    """The threestudio checkout to test against, or None when there is none."""
    env = os.environ.get("THREESTUDIO_ROOT")
    if env:
        return Path(env).resolve() if (Path(env) / "launch.py").is_file() else None
    recorded = REPO / ".threestudio_root"  # written by install.sh, which may have linked the repo from elsewhere
    if recorded.is_file():
        path = Path(recorded.read_text().strip())
        if (path / "launch.py").is_file():
            return path.resolve()
    host = REPO.parents[1]  # threestudio/custom/threestudio-animate124 -> threestudio
    if REPO.parent.name == "custom" and (host / "launch.py").is_file() and (host / "threestudio").is_dir():
        return host
    local = REPO / ".deps" / "threestudio"
    if (local / "launch.py").is_file():
        return local
    vendored = _vendored_copy()
    if vendored is not None:
        return vendored
    spec = importlib.util.find_spec("threestudio")
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).resolve().parents[1]
        if (root / "launch.py").is_file():
            return root
    return None


def why_unavailable() -> str | None:
    """A one-line reason the integration tier cannot run here, or None when it can."""
    if os.environ.get("THREESTUDIO_ROOT") and threestudio_root() is None:
        return f"THREESTUDIO_ROOT={os.environ['THREESTUDIO_ROOT']} holds no launch.py"
    if threestudio_root() is None:
        return ("no threestudio checkout: clone this repo into threestudio/custom/, set THREESTUDIO_ROOT, put one in "
                ".deps/threestudio, or keep ../shared/vendor/threestudio beside the repo (docs/testing.md)")
    missing = [pkg for mod, pkg in HOST_IMPORTS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        return f"threestudio's import-time dependencies are missing: pip install -e '.[integration]' ({', '.join(missing)})"
    return None


_loaded: ModuleType | None = None


def load_threestudio() -> ModuleType:
    """Import threestudio, load the extension through launch.py's loader, and run the host on CPU if needed."""
    global _loaded
    if _loaded is None:
        from animate124.tools.host import load_extension, use_cpu

        root = threestudio_root()
        assert root is not None, why_unavailable()
        _loaded = load_extension(root)
        use_cpu()
    return _loaded
