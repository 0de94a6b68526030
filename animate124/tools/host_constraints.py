"""What pip may change in threestudio's environment, for install.sh.

    python animate124/tools/host_constraints.py PATH_TO_THREESTUDIO OUT_FILE

writes a pip constraints file that every ``pip install`` of install.sh uses, so installing this package or its
extras never moves the host's packages past what the environment declares:

* the version bounds the installed packages declare on each other (threestudio's gradio 4.11: ``numpy<2``,
  ``pillow<11``), where the installed versions satisfy them;
* threestudio's own pins (its ``requirements.txt``: ``transformers==4.28.1``, ``diffusers<0.20``, ...), where the
  installed versions satisfy them (a newer stack installed on purpose is never pulled back);
* the pins of :data:`KNOWN_FIXES` (pairs known to break: diffusers 0.19 with huggingface_hub >= 0.26), where they
  hold today.

A bound the environment does not satisfy today is left out: the constraints only keep what works, never force a
change. :func:`fixes` lists the known-broken pairs found, as pip requirements (install.sh puts them in its one pip
line). Standard library only (``packaging``, or pip's copy of it): it runs before this package is installed.
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]


@dataclass(frozen=True)
class Fix:
    when: str
    """A requirement on an installed distribution (``diffusers<0.26``) that makes ``pin`` necessary."""
    pin: str
    """What must then hold (``huggingface_hub<0.26``)."""
    why: str


KNOWN_FIXES = (
    Fix("diffusers<0.26", "huggingface_hub<0.26",
        "diffusers < 0.26 imports huggingface_hub.cached_download, which huggingface_hub 0.26 removed"),
    Fix("pytorch-lightning<2.1", "setuptools<82",
        "pytorch-lightning 2.0 imports pkg_resources at import time, which setuptools 82 removed"),
    Fix("libigl>=2.6", "libigl==2.5.1", "libigl 2.6 renamed the functions threestudio imports"),
)
UPPER_BOUNDS = ("<", "<=", "==", "~=", "===")
"""The operators kept: what stops an upgrade (lower bounds already hold, and they stop nothing)."""
HOST_NAME_MAP = {"lightning": "pytorch-lightning"}
"""threestudio's requirements.txt name -> the distribution threestudio imports (it imports only pytorch_lightning; the
``lightning`` umbrella 2.0.0 no longer installs from PyPI)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, metadata.Distribution]:
    """Canonical name -> the distribution Python imports (the first on sys.path, as layered environments shadow)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name and canonical(name) not in found:
            found[canonical(name)] = dist
    return found


def _version(dist: metadata.Distribution):
    try:
        return Version(dist.version)
    except InvalidVersion:
        return None


def _satisfied(requirement: Requirement, dists: dict) -> bool:
    dist = dists.get(canonical(requirement.name))
    version = _version(dist) if dist else None
    return version is not None and requirement.specifier.contains(version, prereleases=True)


def host_requirements(threestudio: Path | None) -> list[Requirement]:
    """The PyPI lines of threestudio's requirements.txt (git URLs and comments skipped), with the names mapped."""
    path = Path(threestudio) / "requirements.txt" if threestudio else None
    out = []
    for line in path.read_text().splitlines() if path and path.is_file() else []:
        line = line.split("#")[0].strip()
        if not line or "://" in line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonical(req.name) in HOST_NAME_MAP:
            req = Requirement(HOST_NAME_MAP[canonical(req.name)] + str(req.specifier))
        out.append(req)
    return out


def constraints(threestudio: Path | None = None, dists: dict | None = None) -> list[str]:
    """One ``name<spec>`` line per constrained distribution (see the module docstring), sorted by name."""
    dists = installed() if dists is None else dists
    environment = dict(default_environment(), extra="")
    specs: dict[str, list[str]] = {}

    def keep(req: Requirement) -> None:
        upper = [str(s) for s in req.specifier if s.operator in UPPER_BOUNDS]
        if upper and _satisfied(req, dists):
            specs.setdefault(canonical(req.name), []).extend(upper)

    for dist in dists.values():
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate(environment):
                keep(req)
    for req in host_requirements(threestudio):
        keep(req)
    for fix in KNOWN_FIXES:
        if _satisfied(Requirement(fix.when), dists):
            keep(Requirement(fix.pin))
    return [f"{name}{','.join(sorted(set(s)))}" for name, s in sorted(specs.items())]


def fixes(dists: dict | None = None) -> list[Fix]:
    """The known-broken pairs present here: each fix's pin is what pip must install."""
    dists = installed() if dists is None else dists
    return [fix for fix in KNOWN_FIXES
            if _satisfied(Requirement(fix.when), dists) and not _satisfied(Requirement(fix.pin), dists)
            and canonical(Requirement(fix.pin).name) in dists]


def host_pin(pip_name: str, threestudio: Path | None) -> str:
    """``pip_name`` with threestudio's own pin when its requirements.txt has one (``omegaconf`` -> ``omegaconf==2.3.0``)."""
    name = canonical(Requirement(pip_name).name)
    for req in host_requirements(threestudio):
        if canonical(req.name) == name and str(req.specifier) and not Requirement(pip_name).specifier:
            return f"{pip_name}{req.specifier}"
    return pip_name


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python host_constraints.py PATH_TO_THREESTUDIO OUT_FILE", file=sys.stderr)
        return 2
    lines = constraints(Path(argv[0]))
    Path(argv[1]).write_text("# written by install.sh: what this environment declares (see "
                             "animate124/tools/host_constraints.py); pip install ... -c THIS_FILE\n"
                             + "".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
