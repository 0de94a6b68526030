"""`animate124 launch`: our bad-input errors come out as their message alone; anything else keeps its traceback."""
from __future__ import annotations

import pytest

from animate124.tools import launch as launch_tool

FAKE_LAUNCH = """
class PreflightError(ValueError):
    pass
import sys
kind = sys.argv[1]
if kind == "preflight":
    raise PreflightError("2 problem(s) found before step 0; nothing was started:\\n  - one\\n  - two")
if kind == "a124":
    raise ValueError("a124-system: compile_denoisers='max' is not allowed; choose one of default, null")
raise ValueError("something else")
"""


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    (tmp_path / "launch.py").write_text(FAKE_LAUNCH)
    (tmp_path / "threestudio").mkdir()
    (tmp_path / "threestudio" / "__init__.py").write_text("")
    (tmp_path / "custom" / "threestudio-animate124").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch_tool, "_run_on_cpu", lambda: None)
    monkeypatch.setattr("sys.argv", list(__import__("sys").argv))  # launch() sets sys.argv for launch.py
    return tmp_path


def test_preflight_list_and_a124_lines_print_alone_and_exit_1(checkout, capsys):
    assert launch_tool.launch(["preflight"]) == 1
    err = capsys.readouterr().err
    assert "animate124 launch: 2 problem(s) found before step 0; nothing was started:\n  - one\n  - two" in err
    assert "Traceback" not in err
    assert launch_tool.launch(["a124"]) == 1
    assert "animate124 launch: a124-system: compile_denoisers='max' is not allowed" in capsys.readouterr().err


def test_other_errors_keep_their_traceback(checkout):
    with pytest.raises(ValueError, match="something else"):
        launch_tool.launch(["other"])
