"""`animate124 benchmark`: its --help, and bad input refused in one line before anything loads."""
from __future__ import annotations

import pytest

from animate124.tools.cli import main


def test_help_names_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in ("CONFIG", "--models", "--warmup", "--steps", "--replays", "--eval-images", "--export-times", "--set",
                 "--workdir", "--out", "floor", "never for quality"):
        assert word in text, word
    with pytest.raises(SystemExit):
        main(["make-tiny-models", "--help"])
    assert "--full-size" in capsys.readouterr().out


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    assert main(["benchmark", str(config)]) == 1
    assert capsys.readouterr().err.strip() == f"animate124 benchmark: error: config {config} does not exist"
    config.write_text("name: x\n")
    assert main(["benchmark", str(config), "--steps", "1"]) == 1
    assert "need at least 1 warm-up and 2 timed steps" in capsys.readouterr().err
    out = tmp_path / "bench.json"
    out.write_text("{}")
    assert main(["benchmark", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "{}"  # never overwritten
