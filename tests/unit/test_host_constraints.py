"""install.sh's constraints: what the environment declares keeps pip from moving the host's packages; a bound the
environment does not meet today is never forced."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from animate124.tools import host_constraints as hc

REPO = Path(__file__).resolve().parents[2]


class _Dist:
    def __init__(self, name, version, requires=()):
        self.metadata, self.version, self.requires = {"Name": name}, version, list(requires)


def _env(*dists):
    return {hc.canonical(d.metadata["Name"]): d for d in dists}


def test_threestudios_gradio_keeps_numpy_and_pillow_below_their_bounds(tmp_path):
    """The pinned environment the issue met: gradio 4.11 declares numpy~=1.0 and pillow<11; rembg's newest releases
    need numpy>=2. The constraints carry gradio's bounds (pip then chooses an older rembg), not rembg's."""
    env = _env(_Dist("gradio", "4.11.0", ["numpy~=1.0", "pillow<11.0,>=8.0", "fastapi; extra == 'oauth'"]),
               _Dist("numpy", "1.26.4"), _Dist("Pillow", "10.4.0"),
               _Dist("opencv-python", "4.10.0.84", ['numpy>=2; python_version >= "3.9" and python_version < "3.0"']))
    assert hc.constraints(None, env) == ["numpy~=1.0", "pillow<11.0"]


def test_a_bound_the_environment_does_not_meet_is_left_out():
    """A newer stack installed on purpose is never pulled back: transformers 5 stays although threestudio pins 4.28.1
    (the bound is dropped), while omegaconf 2.3.0, which meets its pin, keeps it."""
    env = _env(_Dist("transformers", "5.25.0"), _Dist("omegaconf", "2.3.0"), _Dist("x", "1", ["omegaconf<2.2"]))
    assert hc.constraints(None, env) == []


def test_threestudios_own_pins_and_the_known_fixes(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "lightning==2.0.0\nomegaconf==2.3.0\ngit+https://github.com/KAIR-BAIR/nerfacc.git@v0.5.2\n"
        "diffusers<0.20\ntransformers==4.28.1\nlibigl\n# deepfloyd\nxformers\n")
    env = _env(_Dist("pytorch-lightning", "2.0.0"), _Dist("omegaconf", "2.3.0"), _Dist("diffusers", "0.19.3"),
               _Dist("transformers", "4.28.1"), _Dist("huggingface-hub", "0.25.2"), _Dist("setuptools", "81.0.0"))
    assert hc.constraints(tmp_path, env) == ["diffusers<0.20", "huggingface-hub<0.26", "omegaconf==2.3.0",
                                             "pytorch-lightning==2.0.0", "setuptools<82", "transformers==4.28.1"]
    assert hc.fixes(env) == []
    broken = _env(_Dist("diffusers", "0.19.3"), _Dist("huggingface_hub", "0.30.1"), _Dist("libigl", "2.6.1"))
    assert [f.pin for f in hc.fixes(broken)] == ["huggingface_hub<0.26", "libigl==2.5.1"]
    assert hc.host_pin("omegaconf", tmp_path) == "omegaconf==2.3.0"
    assert hc.host_pin("pytorch-lightning", tmp_path) == "pytorch-lightning==2.0.0"  # threestudio's lightning pin
    assert hc.host_pin("libigl==2.5.1", tmp_path) == "libigl==2.5.1"  # ours, not overridden


def test_the_script_runs_by_path_without_this_package(tmp_path):
    """install.sh runs it before this package is installed: it must not import animate124 (nor torch & co.)."""
    out = tmp_path / "constraints.txt"
    script = REPO / "animate124" / "tools" / "host_constraints.py"
    check = ("import runpy, sys\nsys.argv = ['host_constraints.py', sys.argv[1], sys.argv[2]]\n"
             f"try:\n    runpy.run_path({str(script)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
             "    assert not e.code\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('animate124', 'torch', 'diffusers')))")
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path), str(out)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert out.read_text().startswith("# written by install.sh")
