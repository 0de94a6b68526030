"""Load a real threestudio checkout and this extension the way ``launch.py`` does; run the host on the CPU.

One home for what the integration tests, ``animate124 launch-cpu`` and the benchmarks need:

* :func:`install_stand_ins`: threestudio imports ``tinycudann``, ``nvdiffrast``, ``wandb``, ``controlnet_aux``,
  ``igl`` and ``IPython`` at module level. Where one is missing, or cannot import here (the real ``tinycudann``
  raises without CUDA), an import stand-in from ``host_stand_ins/`` takes its name. Our components never call them;
  a host feature that does gets a one-line error naming the package.
* :func:`load_extension`: ``launch.py``'s own ``load_custom_module`` on ``custom/threestudio-animate124`` (linked to
  this repo when absent; an unrelated folder there is never replaced).
* :func:`use_cpu`: threestudio fixes every component on ``cuda:<rank>`` through ``get_device``, imported by name in
  many modules; without CUDA every such reference is pointed at the CPU.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "threestudio-animate124"
STAND_INS = Path(__file__).resolve().parent / "host_stand_ins"
STAND_IN_NAMES = ("tinycudann", "nvdiffrast", "wandb", "controlnet_aux", "igl", "IPython")


def install_stand_ins() -> list[str]:
    """Give each import-only host dependency that cannot import here a stand-in; return the names replaced."""
    replaced = []
    for name in STAND_IN_NAMES:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            continue
        except Exception:  # missing, or the real tinycudann without CUDA (EnvironmentError)
            sys.modules.pop(name, None)
        spec = importlib.util.spec_from_file_location(
            name, STAND_INS / name / "__init__.py", submodule_search_locations=[str(STAND_INS / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        replaced.append(name)
    return replaced


@contextlib.contextmanager
def chdir(path: Path):
    """launch.py lists ``custom/`` relative to the working directory (contextlib.chdir needs Python 3.11)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def link_extension(root: Path) -> Path:
    """Make ``custom/threestudio-animate124`` in the checkout point at this repo; never replace a real folder."""
    target = root / "custom" / EXTENSION_NAME
    if target.is_symlink() and target.resolve() != REPO:
        target.unlink()
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        target.symlink_to(REPO, target_is_directory=True)
    if target.resolve() != REPO:
        raise RuntimeError(f"{target} is another copy of the extension: move it away, or use that copy")
    return target


def load_extension(root: Path) -> ModuleType:
    """Import threestudio from ``root`` and load the extension through launch.py's own loader."""
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    install_stand_ins()
    import threestudio

    link_extension(root)
    spec = importlib.util.spec_from_file_location("threestudio_launch", root / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    with chdir(root):
        ok = launch.load_custom_module(os.path.join("custom", EXTENSION_NAME))
    if not ok:
        raise RuntimeError("launch.py's loader reported IMPORT FAILED for the extension (traceback above)")
    return threestudio


def use_cpu() -> bool:
    """Point threestudio's ``get_device`` at the CPU in every loaded module when CUDA is absent; True if it did."""
    import torch

    if torch.cuda.is_available():
        return False
    import threestudio.utils.misc as misc

    original = getattr(misc, "_a124_original_get_device", misc.get_device)
    misc._a124_original_get_device = original

    def get_device():
        return torch.device("cpu")

    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "get_device", None) is original:
            module.get_device = get_device
    return True
