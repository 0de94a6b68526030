"""Check, in one pass, what threestudio and our components need in this environment (install.sh's step 3).

    python -m animate124.tools.host_check PATH_TO_THREESTUDIO

Prints every missing package at once with the name pip knows it by, the exact command for the GitHub-only host
packages and which host features need them, one line comparing the versions found with the ones CI tests, and finally
loads the extension through launch.py's own loader (with import stand-ins for GitHub-only packages that are missing,
which our components never use) to show that every a124-* name registers. Exit status 0 when the extension loads.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class Requirement:
    module: str
    """The import name."""
    install: str
    """What to run (pip name and pin, or the GitHub command)."""
    why: str = ""
    """Who needs it."""
    check: Optional[Callable[[object], Optional[str]]] = None
    """Given the imported module: None when usable, else the reason."""


def _libigl_api(module) -> Optional[str]:
    if not hasattr(module, "fast_winding_number_for_meshes"):
        return "libigl >= 2.6 renamed the functions threestudio imports"
    return None


# threestudio's module-level imports (its requirements.txt), then what launch.py and our components use at run time
PYPI = (
    Requirement("pytorch_lightning", "pytorch-lightning", "threestudio"),
    Requirement("omegaconf", "omegaconf", "threestudio"),
    Requirement("jaxtyping", "jaxtyping", "threestudio"),
    Requirement("typeguard", "typeguard", "threestudio"),
    Requirement("cv2", "opencv-python", "threestudio"),
    Requirement("imageio", "imageio", "threestudio"),
    Requirement("imageio_ffmpeg", "imageio-ffmpeg", "mp4 videos"),
    Requirement("matplotlib", "matplotlib", "threestudio"),
    Requirement("scipy", "scipy", "threestudio, a124 mesh export"),
    Requirement("trimesh", "trimesh", "threestudio, a124 mesh export"),
    Requirement("einops", "einops", "threestudio"),
    Requirement("requests", "requests", "threestudio"),
    Requirement("torchvision", "torchvision", "threestudio"),
    Requirement("torchmetrics", "torchmetrics", "threestudio"),
    Requirement("diffusers", "diffusers", "threestudio, a124 guidances"),
    Requirement("transformers", "transformers", "threestudio, a124 guidances"),
    Requirement("accelerate", "accelerate", "threestudio prompt processors"),
    Requirement("nerfacc", "nerfacc", "threestudio, a124 renderer"),
    Requirement("envlight", "envlight", "threestudio"),
    Requirement("tensorboard", "tensorboard", "launch.py's TensorBoardLogger"),
    Requirement("wandb", "wandb", "threestudio (imported only; our components never log to it)"),
    Requirement("controlnet_aux", "controlnet_aux", "threestudio's controlnet guidance (imported only)"),
    Requirement("IPython", "ipython", "threestudio's zero123 LDM guidance (imported only)"),
    Requirement("igl", "libigl==2.5.1", "threestudio.utils.ops (imported only)", _libigl_api),
    Requirement("pygltflib", "pygltflib", "a124 animated .glb export"),
)
GITHUB_ONLY = (
    Requirement("tinycudann", "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
                "threestudio's own hash-grid geometries and networks (implicit-volume, implicit-sdf, neural "
                "environment maps); a124-4d-volume needs it only with implementation: tcnn"),
    Requirement("nvdiffrast", "pip install git+https://github.com/NVlabs/nvdiffrast.git",
                "threestudio's mesh rasteriser (nvdiff-rasterizer, textured mesh export, Magic3D/Fantasia3D "
                "stage 2); no a124 component uses it"),
)
GITHUB_ONLY_NAMES = tuple(req.module for req in GITHUB_ONLY)
# not needed for real runs; named once so the first smoke run does not fail on them
OPTIONAL = (
    Requirement("open_clip", "-e '.[testing]'", "the smoke config and `animate124 make-tiny-models` (CLIP's "
                "vocabulary for the tiny models)"),
)
# what CI tests: threestudio's pins and current releases
TESTED = {
    "omegaconf": ("2.3.0", "2.4"),
    "pytorch-lightning": ("2.0.0", "2.6"),
    "diffusers": ("0.19.3", "0.42"),
    "transformers": ("4.28.1", "5.24"),
}


def problem(req: Requirement) -> Optional[str]:
    """None when ``req`` imports and is usable, else a short reason."""
    if importlib.util.find_spec(req.module) is None:
        return "not installed"
    try:
        module = importlib.import_module(req.module)
    except ModuleNotFoundError as error:
        if error.name in GITHUB_ONLY_NAMES:  # envlight imports nvdiffrast: reported once, under nvdiffrast
            return None
        return f"does not import ({error})"
    except Exception as error:  # e.g. the real tinycudann without CUDA, or a broken build
        return f"does not import ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    return req.check(module) if req.check else None


def version_line() -> str:
    """One line: each version found, and whether CI tests it."""
    parts = []
    for dist, tested in TESTED.items():
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} missing")
            continue
        ok = any(found == t or found.startswith(t + ".") for t in tested)
        parts.append(f"{dist} {found}" + ("" if ok else f" (untested; CI tests {' and '.join(tested)})"))
    hub_note = ""
    try:
        diffusers = importlib.metadata.version("diffusers")
        hub = importlib.metadata.version("huggingface_hub")
        if diffusers.startswith("0.19.") and tuple(int(x) for x in hub.split(".")[:2]) >= (0, 26):
            hub_note = f"; huggingface_hub {hub} breaks diffusers {diffusers}: pip install 'huggingface_hub<0.26'"
    except (importlib.metadata.PackageNotFoundError, ValueError):
        pass
    return "versions: " + ", ".join(parts) + hub_note


def report() -> tuple[list[str], list[Requirement]]:
    """(lines about missing PyPI packages, GitHub-only requirements that are missing)."""
    lines = []
    missing = [(req, problem(req)) for req in PYPI]
    missing = [(req, why) for req, why in missing if why]
    if missing:
        lines.append("missing Python packages (install them all at once):")
        lines.append("  pip install " + " ".join(f"'{req.install}'" for req, _ in missing))
        lines += [f"    {req.module}: {why}; needed by {req.why}" for req, why in missing]
    github = [req for req in GITHUB_ONLY if problem(req)]
    return lines, github


def optional_lines() -> list[str]:
    """One line per missing optional package: what needs it and the pip command (informational)."""
    return [f"      optional: {req.module} is not installed; needed by {req.why}: pip install {req.install}"
            for req in OPTIONAL if problem(req)]


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m animate124.tools.host_check PATH_TO_THREESTUDIO", file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    lines, github = report()
    print("      " + version_line())
    for req in github:
        print(f"      {req.module} is not usable here ({problem(req)}). Needed only by {req.why}. "
              f"To install it (needs CUDA and a compiler): {req.install}")
    for line in optional_lines():
        print(line)
    from animate124.tools.host import STAND_IN_NAMES, load_extension

    if lines:
        print("host_check: " + "\n".join(lines), file=sys.stderr)
        if any(req.module not in STAND_IN_NAMES for req in PYPI if problem(req)):
            return 1
        # only import-only host packages are missing: still show that the extension loads (with stand-ins for them),
        # so one pass says everything; the exit status stays 1 since `python launch.py` imports them
        print("      (the missing ones are imported by threestudio only: loading the extension with stand-ins for them)")

    try:
        threestudio = load_extension(root)
    except Exception as error:
        print(f"host_check: launch.py could not load the extension: {error}", file=sys.stderr)
        return 1
    from animate124.components import REGISTERED_NAMES

    absent = [n for n in REGISTERED_NAMES if n not in threestudio.__modules__]
    if absent:
        print(f"host_check: these components did not register: {', '.join(absent)}", file=sys.stderr)
        return 1
    print(f"      threestudio {threestudio.__version__}: {len(REGISTERED_NAMES)} a124-* components registered")
    if lines:
        print("      `python launch.py` needs the packages listed above; `animate124 launch ...` (same arguments) runs "
              "without them (CPU machines, tests)")
        return 1
    if github:
        names = " and ".join(req.module for req in github)
        print(f"      without {names}, `python launch.py` cannot import threestudio; `animate124 launch ...` (same "
              "arguments) runs launch.py with import stand-ins for them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
