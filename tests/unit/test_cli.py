"""The `animate124` entry point: every sub-command's --help, usage errors, cheap import, make-tiny-models."""

from __future__ import annotations

import subprocess
import sys

import pytest

from animate124.tools.cli import main

pytestmark = pytest.mark.unit

EXPECTED = {
    "preprocess": ["IMAGE", "--out", "--size", "--border-ratio", "--depth-model", "--no-depth", "--overwrite"],
    "invert": ["IMAGE", "--token", "--init", "--out", "--model", "--steps", "--batch-size", "--lr", "--seed",
               "--precision", "--overwrite"],
    "evaluate": ["RUN_DIR", "--batch", "--image", "--prompt", "--clip-model", "--frames-glob", "--out", "--overwrite",
                 "run.json", "clip_t", "clip_i", "temporal", "retrieval"],
    "run-benchmark": ["DATA_DIR", "--out", "--threestudio", "--config", "--shard", "--dry-run", "--cases", "--gpu",
                      "--extra", "--reuse-from", "SLURM", ".done"],
    "make-tiny-models": ["DIR", "--kinds"],
    "report": ["TRIAL_DIR", "--image", "report.html"],
}


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_help_names_every_argument(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: animate124 {command}")
    missing = [word for word in EXPECTED[command] if word not in text]
    assert not missing, f"--help of {command} does not mention {missing}"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in EXPECTED)


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert "usage: animate124" in capsys.readouterr().err


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["invert", "photo.jpg", "--token", "_x_"])
    assert exit_info.value.code == 2
    assert "--init" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    code = "import sys; from animate124.tools.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "animate124.tools.cli", "preprocess", str(tmp_path / "none.png"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("animate124 preprocess: error: IMAGE")


def test_make_tiny_models(tmp_path, capsys):
    assert main(["make-tiny-models", str(tmp_path), "--kinds", "clip"]) == 0
    assert capsys.readouterr().out.strip() == f"clip\t{tmp_path / 'clip'}"
    assert (tmp_path / "clip" / "config.json").is_file()
    assert main(["make-tiny-models", str(tmp_path), "--kinds", "nope"]) == 1
    assert "unknown kinds ['nope']" in capsys.readouterr().err


def test_make_tiny_models_without_open_clip_names_the_package_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    hidden = "open_clip"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a))
    out = tmp_path / "models"
    assert main(["make-tiny-models", str(out), "--kinds", "controlnet-tile,sd"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "pip install open_clip_torch" in errors[0]
    assert not out.exists()  # checked before the first folder is made


def test_natural_key_orders_digit_runs_by_value():
    from animate124.tools.cli import natural_key

    names = ["it15000-test", "10.png", "it2000-test", "2.png", "B1.png", "a10.png", "a9.png"]
    assert sorted(names, key=natural_key) == ["2.png", "10.png", "a9.png", "a10.png", "B1.png", "it2000-test",
                                              "it15000-test"]
