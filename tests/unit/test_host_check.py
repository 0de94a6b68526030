"""install.sh's one-pass check: every missing package at once, with pip names; GitHub-only ones with their command."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

from animate124.tools import host_check
from animate124.tools.host_check import Requirement


def test_every_missing_package_is_listed_at_once_with_its_pip_name(monkeypatch, tmp_path):
    monkeypatch.setattr(host_check, "REPO", tmp_path)  # no constraints file here: the line ends with the names
    monkeypatch.setattr(host_check, "PYPI", (
        Requirement("json", "json-is-stdlib", "x"),  # importable: not listed
        Requirement("a124_absent_cv2", "opencv-python", "threestudio"),
        Requirement("a124_absent_igl", "libigl==2.5.1", "threestudio.utils.ops"),
    ))
    lines, github = host_check.report()
    assert lines[1] == "  pip install 'opencv-python' 'libigl==2.5.1'"
    assert "a124_absent_cv2: not installed; needed by threestudio" in lines[2]
    assert len(lines) == 4
    (tmp_path / ".pip-constraints.txt").write_text("numpy<2\n")  # install.sh's: every pip line then uses it
    assert host_check.report()[0][1] == f"  pip install 'opencv-python' 'libigl==2.5.1' -c {tmp_path}/.pip-constraints.txt"


def test_a_module_that_imports_but_lacks_the_api_is_reported(monkeypatch):
    monkeypatch.setattr(host_check, "PYPI", (Requirement("json", "libigl==2.5.1", "ops", host_check._libigl_api),))
    lines, _ = host_check.report()
    assert "libigl >= 2.6 renamed the functions threestudio imports" in lines[2]


def test_a_missing_github_only_dependency_of_a_pypi_package_is_not_blamed_on_it(monkeypatch, tmp_path):
    pkg = tmp_path / "a124_needs_gh"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import a124_github_only_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(host_check, "GITHUB_ONLY_NAMES", ("a124_github_only_pkg",))
    assert host_check.problem(Requirement("a124_needs_gh", "x")) is None
    monkeypatch.setattr(host_check, "GITHUB_ONLY_NAMES", ())
    assert "does not import" in host_check.problem(Requirement("a124_needs_gh", "x"))


def test_version_line_marks_untested_versions(monkeypatch):
    found = {"omegaconf": "2.3.0", "pytorch-lightning": "2.1.3", "diffusers": "0.19.3", "transformers": "4.28.1"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found[name])
    line = host_check.version_line()
    assert line == ("versions: omegaconf 2.3.0, pytorch-lightning 2.1.3 (untested; CI tests 2.0.0 and 2.6), "
                    "diffusers 0.19.3, transformers 4.28.1")


def test_a_missing_optional_package_is_named_with_the_absolute_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(host_check, "OPTIONAL", (
        Requirement("json", "x", "nothing"),  # importable: not listed
        Requirement("a124_absent_open_clip", "testing", "the smoke config"),
    ))
    assert host_check.optional_lines(tmp_path) == [
        f"      optional: a124_absent_open_clip is not installed; needed by the smoke config: bash "
        f"{host_check.REPO / 'install.sh'} {tmp_path} testing"]


def test_an_installed_package_broken_by_another_ones_version_gets_that_fix_not_its_own_name(monkeypatch):
    """diffusers 0.19 with huggingface_hub 0.26+ fails to import: the pip line asks for huggingface_hub<0.26 (not for
    diffusers, which is installed), and the import error is printed whole."""
    from animate124.tools import host_constraints

    error = ("does not import (ImportError: cannot import name 'cached_download' from 'huggingface_hub' "
             "(/a/long/path/site-packages/huggingface_hub/__init__.py))")
    monkeypatch.setattr(host_check, "PYPI", (Requirement("diffusers", "diffusers", "a124 guidances"),
                                             Requirement("a124_absent_wandb", "wandb", "threestudio")))
    monkeypatch.setattr(host_check, "GITHUB_ONLY", ())
    monkeypatch.setattr(host_check, "problem", lambda req: error if req.module == "diffusers" else "not installed")
    monkeypatch.setattr(host_constraints, "installed", lambda: _dists(diffusers="0.19.3", huggingface_hub="0.30.1"))
    lines, _ = host_check.report()
    assert lines[1].startswith("  pip install 'wandb' 'huggingface_hub<0.26'")
    assert "'diffusers'" not in lines[1]
    assert lines[-1] == f"    diffusers is installed but {error}; needed by a124 guidances"


class _Dist:
    def __init__(self, name, version, requires=()):
        self.metadata, self.version, self.requires = {"Name": name}, version, list(requires)


def _dists(**versions):
    from animate124.tools.host_constraints import canonical

    return {canonical(name): _Dist(name, version) for name, version in versions.items()}


def test_plan_installs_missing_host_packages_with_threestudios_pins_and_skips_an_editable_install_here(
        monkeypatch, tmp_path):
    from animate124.tools import host_constraints

    (tmp_path / "requirements.txt").write_text("lightning==2.0.0\nomegaconf==2.3.0\ndiffusers<0.20\n"
                                               "git+https://github.com/NVlabs/nvdiffrast.git\nwandb\n")
    monkeypatch.setattr(host_check, "PYPI", (Requirement("a124_absent_pl", "pytorch-lightning", "threestudio"),
                                             Requirement("a124_absent_diffusers", "diffusers", "guidances"),
                                             Requirement("a124_absent_wandb", "wandb", "threestudio"),
                                             Requirement("json", "json", "x")))
    monkeypatch.setattr(host_constraints, "installed", lambda: _dists(huggingface_hub="0.30.1"))
    monkeypatch.setattr(host_check, "installed_here", lambda: None)
    assert host_check.plan(tmp_path, ["testing"]) == [
        "pytorch-lightning==2.0.0", "diffusers<0.20", "wandb", "huggingface_hub<0.26", "setuptools<82", "-e",
        f"{host_check.REPO}[testing]"]
    # installed editable from this checkout: only what its requirements lack, no second editable install
    monkeypatch.setattr(host_check, "PYPI", ())
    monkeypatch.setattr(host_check, "installed_here", lambda: "dist")
    monkeypatch.setattr(host_check, "unmet", lambda dist, extras: ["open_clip_torch"] if extras else [])
    assert host_check.plan(tmp_path, ["testing"]) == ["open_clip_torch"]
    assert host_check.plan(tmp_path, []) == []


def test_the_editable_install_of_this_checkout_is_recognised(monkeypatch, tmp_path):
    import json
    from pathlib import Path

    class Dist:
        def __init__(self, path, url):
            self._path, self.url = Path(path), url

        def read_text(self, name):
            return json.dumps(self.url) if self.url else None

    here = {"url": host_check.REPO.as_uri(), "dir_info": {"editable": True}}
    other = {"url": (tmp_path / "elsewhere").as_uri(), "dir_info": {"editable": True}}
    egg_info = Dist(host_check.REPO / "threestudio_animate124.egg-info", None)  # the build's own, skipped
    for dists, expected in [([egg_info, Dist(tmp_path / "site/x.dist-info", here)], True),
                            ([Dist(tmp_path / "site/x.dist-info", other)], False),
                            ([Dist(tmp_path / "site/x.dist-info", {"url": "https://x", "dir_info": {}})], False),
                            ([], False)]:
        monkeypatch.setattr(importlib.metadata, "distributions", lambda name=None, dists=dists: iter(dists))
        assert (host_check.installed_here() is not None) == expected


def test_unbuildable_pysdf_gets_the_way_around_it(monkeypatch, tmp_path):
    monkeypatch.setattr(host_check, "UNBUILDABLE", (Requirement("a124_absent_pysdf", "pysdf", "no a124 component "
                                                                "needs it"),))
    (line,) = host_check.unbuildable_lines(tmp_path)
    assert "apt-get install libeigen3-dev" in line and "no a124 component needs it" in line
    assert line.endswith(f"grep -v '^pysdf' {tmp_path}/requirements.txt > /tmp/threestudio-requirements.txt && pip "
                         "install -r /tmp/threestudio-requirements.txt")


def test_next_command_works_on_this_machine(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = host_check.next_command(tmp_path, launch_ready=True)
    assert cpu.startswith(f"cd {tmp_path} && ") and "--gpu" not in cpu
    assert cpu.endswith(" launch --config custom/threestudio-animate124/configs/animate124-smoke.yaml --train")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert host_check.next_command(tmp_path, launch_ready=True) == (
        f"cd {tmp_path} && python launch.py --config custom/threestudio-animate124/configs/animate124-smoke.yaml "
        "--train --gpu 0")
    assert "--gpu" not in host_check.next_command(tmp_path, launch_ready=False)  # no tinycudann: stand-ins needed


def test_the_loader_check_still_runs_when_only_import_only_host_packages_are_missing(monkeypatch, capsys, tmp_path):
    """A CPU machine without wandb & co. still learns in one pass that the extension registers; the exit status
    stays 1 (``python launch.py`` imports them). Any other missing package stops before loading."""
    import sys
    import types

    from animate124.tools import host

    REGISTERED_NAMES = ("a124-system", "a124-4d-volume")  # the real list needs threestudio (integration tier)
    monkeypatch.setitem(sys.modules, "animate124.components", types.SimpleNamespace(REGISTERED_NAMES=REGISTERED_NAMES))

    loaded = []
    fake = types.SimpleNamespace(__version__="0.2.3", __modules__={n: None for n in REGISTERED_NAMES})
    monkeypatch.setattr(host, "load_extension", lambda root: loaded.append(root) or fake)
    monkeypatch.setattr(host, "STAND_IN_NAMES", host.STAND_IN_NAMES + ("a124_absent_wandb",))
    monkeypatch.setattr(host_check, "GITHUB_ONLY", ())
    monkeypatch.setattr(host_check, "PYPI", (Requirement("a124_absent_wandb", "wandb", "threestudio"),))
    assert host_check.main([str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "pip install 'wandb'" in out.err and len(loaded) == 1
    assert f"{len(REGISTERED_NAMES)} a124-* components registered" in out.out
    assert "`animate124 launch ...` (same arguments) runs without them" in out.out

    monkeypatch.setattr(host_check, "PYPI", (Requirement("a124_absent_wandb", "wandb", "threestudio"),
                                             Requirement("a124_absent_omegaconf", "omegaconf==2.3.0", "threestudio")))
    assert host_check.main([str(tmp_path)]) == 1
    assert len(loaded) == 1 and "registered" not in capsys.readouterr().out


def test_install_hints_name_absolute_paths(monkeypatch, tmp_path):
    """Every hint works from any folder: install.sh for the recorded threestudio checkout, else pip on this one."""
    recorded = host_check.REPO / ".threestudio_root"
    monkeypatch.setattr(host_check, "REPO", tmp_path)
    assert host_check.install_hint(None, "tools") == f"pip install -e '{tmp_path}[tools]'"
    (tmp_path / ".threestudio_root").write_text("/opt/threestudio\n")
    assert host_check.install_hint(None, "tools") == f"bash {tmp_path}/install.sh /opt/threestudio tools"
    assert host_check.install_hint(Path("/x/ts"), "testing") == f"bash {tmp_path}/install.sh /x/ts testing"
    assert recorded.parent != tmp_path
