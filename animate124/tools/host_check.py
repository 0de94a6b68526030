"""Check, in one pass, what threestudio and our components need in this environment (install.sh's steps 1 and 3).

    python -m animate124.tools.host_check PATH_TO_THREESTUDIO --plan EXTRAS   the pip arguments of install.sh's one
                                                                           pip command (nothing heavy is imported)
    python -m animate124.tools.host_check PATH_TO_THREESTUDIO                the check

The plan: the host's missing import-time packages (with threestudio's own pins), the pins that fix known-broken pairs
(``huggingface_hub<0.26`` beside diffusers 0.19, never the name of the installed package that fails), and this
package with its extras unless it is already installed editable from this checkout (then only what its requirements
lack). The check prints one line comparing the versions found with the ones CI tests, what to do about the host's
GitHub-only and unbuildable optional packages, any package that is installed but does not import (its whole
error), loads the extension through launch.py's own loader (with import stand-ins for GitHub-only packages that are
missing, which our components never use) to show that every a124-* name registers, and ends with the next command
that works on this machine. Exit status 0 when the extension loads and nothing the host imports is missing.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parents[2]
DIST = "threestudio-animate124"
SMOKE = "custom/threestudio-animate124/configs/animate124-smoke.yaml"
SMOKE_CPU_TIME = "45 s training + 22 s export on 2 idle CPU cores; on a busy machine set OMP_NUM_THREADS=1"
"""The CPU smoke check as measured (README, `animate124 launch --help` and the smoke config say the same)."""


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
# not needed for real runs; named so the first smoke run does not fail on them (install.sh installs [testing])
OPTIONAL = (
    Requirement("open_clip", "testing", "the smoke config and `animate124 make-tiny-models` (CLIP's vocabulary for "
                "the tiny models)"),
)
UNBUILDABLE = (
    Requirement("pysdf", "pysdf", "threestudio imports it only to initialise an implicit-sdf or tetrahedra-sdf-grid "
                "geometry from a mesh; no a124 component needs it"),
)
"""Optional host packages of threestudio's requirements.txt that fail to build on many machines."""
# what CI tests: threestudio's pins and current releases
TESTED = {
    "omegaconf": ("2.3.0", "2.4"),
    "pytorch-lightning": ("2.0.0", "2.6"),
    "diffusers": ("0.19.3", "0.42"),
    "transformers": ("4.28.1", "5.25"),
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
        return f"does not import ({type(error).__name__}: {error})"
    except Exception as error:  # e.g. the real tinycudann without CUDA, or a broken build
        return f"does not import ({type(error).__name__}: {' '.join(str(error).split())})"
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
    return "versions: " + ", ".join(parts)


# ---- install.sh's one pip command ------------------------------------------------------------------------------------


def installed_here() -> Optional[importlib.metadata.Distribution]:
    """This package's installed distribution when it is editable from this checkout, else None. The first one on the
    path counts (what Python imports), skipping the build's own ``*.egg-info`` in the checkout."""
    for dist in importlib.metadata.distributions(name=DIST):
        if Path(str(getattr(dist, "_path", ""))).resolve().parent == REPO:
            continue
        try:
            url = json.loads(dist.read_text("direct_url.json") or "{}")
        except ValueError:
            return None
        if not url.get("dir_info", {}).get("editable") or not url.get("url", "").startswith("file:"):
            return None
        return dist if Path(unquote(urlparse(url["url"]).path)).resolve() == REPO else None
    return None


def unmet(dist: importlib.metadata.Distribution, extras: list[str]) -> list[str]:
    """``dist``'s requirements (and those of ``extras``) that the environment lacks or does not satisfy."""
    from animate124.tools.host_constraints import Requirement as PipRequirement
    from animate124.tools.host_constraints import _satisfied, default_environment, installed

    dists, out = installed(), []
    for line in dist.requires or []:
        req = PipRequirement(line)
        wanted = req.marker is None or any(req.marker.evaluate(dict(default_environment(), extra=e))
                                           for e in ["", *extras])
        if wanted and not _satisfied(req, dists):
            out.append(f"{req.name}{req.specifier}")
    return out


def plan(root: Path, extras: list[str]) -> list[str]:
    """The pip arguments that install everything missing here in one command (see the module docstring)."""
    from animate124.tools.host_constraints import KNOWN_FIXES, canonical, fixes, host_pin

    args = [host_pin(req.install, root) for req in PYPI if importlib.util.find_spec(req.module) is None]
    pinned_now = {canonical(a.split("<")[0].split("=")[0].split(">")[0]) for a in args if any(c in a for c in "<=>")}
    args += [fix.pin for fix in fixes()]
    # a pinned host package installed now may need its fix too (diffusers<0.20 -> huggingface_hub<0.26)
    args += [fix.pin for fix in KNOWN_FIXES if canonical(fix.when.split("<")[0].split(">")[0]) in pinned_now]
    dist = installed_here()
    if dist is None:
        args += ["-e", f"{REPO}[{','.join(extras)}]" if extras else str(REPO)]
    else:
        args += unmet(dist, extras)
    return list(dict.fromkeys(args))


# ---- the check ---------------------------------------------------------------------------------------------------------


def report() -> tuple[list[str], list[Requirement]]:
    """(lines about missing or broken PyPI packages, GitHub-only requirements that are missing).

    The pip line names what to install: a missing package (with its pin), or, for one that is installed but fails to
    import because of another package's version, that version's fix (:data:`host_constraints.KNOWN_FIXES`); an
    installed package that fails to import for another reason is listed apart with its whole error."""
    from animate124.tools.host_constraints import fixes

    found = [(req, problem(req)) for req in PYPI]
    found = [(req, why) for req, why in found if why]
    known = fixes()
    broken = [(req, why) for req, why in found if why.startswith("does not import")]
    to_install = [f"'{req.install}'" for req, why in found if (req, why) not in broken]
    to_install += [f"'{fix.pin}'" for fix in known]
    lines = []
    if to_install:
        lines.append("missing Python packages and version fixes (install them all at once):")
        constraints = REPO / ".pip-constraints.txt"  # install.sh's: what this environment declares
        lines.append("  pip install " + " ".join(dict.fromkeys(to_install))
                     + (f" -c {constraints}" if constraints.is_file() else ""))
        lines += [f"    {req.module}: {why}; needed by {req.why}" for req, why in found if (req, why) not in broken]
        lines += [f"    {fix.pin}: {fix.why}" for fix in known]
    if broken:
        lines += [f"    {req.module} is installed but {why}; needed by {req.why}" for req, why in broken]
    github = [req for req in GITHUB_ONLY if problem(req)]
    return lines, github


def install_hint(root: Optional[Path], extras: str) -> str:
    """The command that adds ``extras``, with absolute paths: install.sh for the threestudio checkout it recorded (or
    ``root``), else pip on this checkout."""
    recorded = REPO / ".threestudio_root"
    if root is None and recorded.is_file():
        root = Path(recorded.read_text().strip())
    if root is not None:
        return f"bash {REPO / 'install.sh'} {root} {extras}"
    return f"pip install -e '{REPO}[{extras}]'"


def optional_lines(root: Path = Path("THREESTUDIO")) -> list[str]:
    """One line per missing optional package: what needs it and the command that adds it (informational)."""
    return [f"      optional: {req.module} is not installed; needed by {req.why}: {install_hint(root, req.install)}"
            for req in OPTIONAL if problem(req)]


def unbuildable_lines(root: Path) -> list[str]:
    """What to do about the host's optional packages that often fail to build (pysdf needs Eigen's headers)."""
    requirements = root / "requirements.txt"
    return [f"      {req.module} is not installed ({req.why}). It builds only with Eigen's headers (Debian/Ubuntu: "
            f"apt-get install libeigen3-dev). If it stopped `pip install -r {requirements}`, install the rest "
            f"without it: grep -v '^{req.install}' {requirements} > /tmp/threestudio-requirements.txt && pip install "
            "-r /tmp/threestudio-requirements.txt" for req in UNBUILDABLE if problem(req)]


def next_command(root: Path, launch_ready: bool) -> str:
    """The smoke check as it runs on this machine: launch.py on a GPU with every host package, else `animate124
    launch` (the same launch.py with stand-ins, on the CPU without CUDA)."""
    import torch

    if launch_ready and torch.cuda.is_available():
        return f"cd {root} && python launch.py --config {SMOKE} --train --gpu 0"
    return f"cd {root} && {tool()} launch --config {SMOKE} --train"


def tool() -> str:
    """``animate124`` when that name on PATH is this environment's, else the module form that always is."""
    found = shutil.which("animate124")
    here = Path(sys.executable).parent / "animate124"
    if found and here.exists() and Path(found).resolve() == here.resolve():
        return "animate124"
    return f"{sys.executable} -m animate124.tools.cli"


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[1] == "--plan":
        for arg in plan(Path(argv[0]).resolve(), [e for e in argv[2].split(",") if e]):
            print(arg)
        return 0
    if len(argv) != 1:
        print("usage: python -m animate124.tools.host_check PATH_TO_THREESTUDIO [--plan EXTRAS]", file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    lines, github = report()
    print("      " + version_line())
    for req in github:
        print(f"      {req.module} is not usable here ({problem(req)}). Needed only by {req.why}. "
              f"To install it (needs CUDA and a compiler): {req.install}")
    for line in unbuildable_lines(root) + optional_lines(root):
        print(line)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPUs
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
    print(f"next: the smoke check ({SMOKE_CPU_TIME}):\n  {next_command(root, launch_ready=not github)}")
    print(f"then: `{tool()} models {root / 'custom/threestudio-animate124/configs/animate124.yaml'}` lists the "
          "weights a real run needs (about 14 GB) and the command that fetches them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
