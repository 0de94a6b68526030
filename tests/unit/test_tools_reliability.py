"""Tools fail on a bad --out before any model loads, in one line, leaving the user's files as they were."""
from __future__ import annotations

import pytest
from PIL import Image

from animate124.tools import evaluate, invert
from animate124.tools.cli import main


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before --out was checked")


def test_invert_out_is_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "out").write_text("the user's file")
    status = main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out",
                   str(tmp_path / "out"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, err
    assert err[0] == (f"animate124 invert: error: --out {str(tmp_path / 'out')!r} is a file: give a folder for "
                      "learned_embeds.safetensors, learned_embeds.bin, invert.json")
    assert (tmp_path / "out").read_text() == "the user's file"


def test_invert_out_under_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "file").write_text("x")
    assert main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out",
                 str(tmp_path / "file" / "sub")]) == 1
    assert "is not a writable folder): choose another --out" in capsys.readouterr().err


def test_evaluate_out_is_a_file_fails_before_scoring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "ClipScorer", _no_model)
    monkeypatch.setattr(evaluate, "load_run", lambda *a, **k: object())
    (tmp_path / "out").write_text("the user's file")
    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "is a file: give a folder for metrics.csv, metrics.md" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "the user's file"


@pytest.mark.parametrize("tool", ["invert", "preprocess"])
def test_existing_outputs_need_overwrite(tmp_path, monkeypatch, capsys, tool):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(tmp_path / "photo.png")
    out = tmp_path / "o"
    out.mkdir()
    name = "learned_embeds.bin" if tool == "invert" else "rgba.png"
    (out / name).write_bytes(b"made by the user")
    args = ["--token", "_x_", "--init", "panda"] if tool == "invert" else ["--no-depth"]
    assert main([tool, str(tmp_path / "photo.png"), "--out", str(out), *args]) == 1
    assert "pass --overwrite to replace" in capsys.readouterr().err
    assert (out / name).read_bytes() == b"made by the user"


def test_make_tiny_models_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """A user's model in DIR/<kind> is never rewritten without --overwrite; folders it made itself are."""
    user = tmp_path / "controlnet-tile"
    user.mkdir()
    (user / "config.json").write_text('{"the": "user\'s model"}')
    assert main(["make-tiny-models", str(tmp_path), "--kinds", "controlnet-tile"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"animate124 make-tiny-models: error: {user} already exist(s) and were not made by make-tiny-models: "
                   "choose another DIR, or pass --overwrite to replace them"]
    assert sorted(p.name for p in user.iterdir()) == ["config.json"]
    assert (user / "config.json").read_text() == '{"the": "user\'s model"}'
    fresh = tmp_path / "fresh"
    assert main(["make-tiny-models", str(fresh), "--kinds", "controlnet-tile"]) == 0
    assert main(["make-tiny-models", str(fresh), "--kinds", "controlnet-tile"]) == 0  # its own folder: rewritten
    assert main(["make-tiny-models", str(tmp_path), "--kinds", "controlnet-tile", "--overwrite"]) == 0
    assert '"user' not in (user / "config.json").read_text()
    (tmp_path / "a_file").write_text("x")
    assert main(["make-tiny-models", str(tmp_path / "a_file")]) == 1
    assert "is a file: give a folder" in capsys.readouterr().err
