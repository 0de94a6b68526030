"""install.sh's one-pass check: every missing package at once, with pip names; GitHub-only ones with their command."""
from __future__ import annotations

import importlib.metadata

from animate124.tools import host_check
from animate124.tools.host_check import Requirement


def test_every_missing_package_is_listed_at_once_with_its_pip_name(monkeypatch):
    monkeypatch.setattr(host_check, "PYPI", (
        Requirement("json", "json-is-stdlib", "x"),  # importable: not listed
        Requirement("a124_absent_cv2", "opencv-python", "threestudio"),
        Requirement("a124_absent_igl", "libigl==2.5.1", "threestudio.utils.ops"),
    ))
    lines, github = host_check.report()
    assert lines[1] == "  pip install 'opencv-python' 'libigl==2.5.1'"
    assert "a124_absent_cv2: not installed; needed by threestudio" in lines[2]
    assert len(lines) == 4


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


def test_version_line_marks_untested_versions_and_the_hub_break(monkeypatch):
    found = {"omegaconf": "2.3.0", "pytorch-lightning": "2.1.3", "diffusers": "0.19.3", "transformers": "4.28.1",
             "huggingface_hub": "0.30.1"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: found[name])
    line = host_check.version_line()
    assert line.startswith("versions: omegaconf 2.3.0, pytorch-lightning 2.1.3 (untested; CI tests 2.0.0 and 2.6)")
    assert "diffusers 0.19.3, transformers 4.28.1;" in line
    assert "pip install 'huggingface_hub<0.26'" in line
    assert "\n" not in line


def test_a_missing_optional_package_is_named_with_what_needs_it(monkeypatch):
    monkeypatch.setattr(host_check, "OPTIONAL", (
        Requirement("json", "-e '.[x]'", "nothing"),  # importable: not listed
        Requirement("a124_absent_open_clip", "-e '.[testing]'", "the smoke config"),
    ))
    assert host_check.optional_lines() == [
        "      optional: a124_absent_open_clip is not installed; needed by the smoke config: pip install -e '.[testing]'"]


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
