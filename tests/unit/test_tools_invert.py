"""`animate124 invert`: the command line of textual inversion on a tiny SD 1.5 (real classes, real CLIP tokenizer,
random weights). The loss and the loop are tested in test_textual_inversion.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checks import one_thread  # noqa: F401  (module fixture: one torch thread)
from conftest import SHARED_DATA

from animate124.tools.cli import main

EXAMPLES = SHARED_DATA / "examples"  # conftest: ../shared/data or $A124_SHARED_DATA
PHOTO = EXAMPLES / "panda-dance" / "image.jpg"

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_sd(tiny_models) -> Path:
    return tiny_models["sd"]


def test_cli_writes_loadable_embeddings(tiny_sd, tmp_path, capsys):
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing")
    args = ["invert", str(PHOTO), "--token", "_panda_", "--init", "panda", "--out", str(tmp_path), "--model",
            str(tiny_sd), "--steps", "2", "--batch-size", "1", "--resolution", "32", "--device", "cpu"]
    assert main(args) == 0
    from safetensors.torch import load_file

    binary = torch.load(tmp_path / "learned_embeds.bin", weights_only=True)
    safe = load_file(tmp_path / "learned_embeds.safetensors")
    assert list(binary) == ["_panda_"] and list(safe) == ["_panda_"]
    assert binary["_panda_"].dtype == torch.float32 and binary["_panda_"].shape == (32,)  # tiny text width
    torch.testing.assert_close(binary["_panda_"], safe["_panda_"], rtol=0, atol=0)
    # the same files again without --overwrite: refused, untouched
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_cli_multi_token_init_is_one_line(tiny_sd, tmp_path, capsys):
    if not PHOTO.exists():
        pytest.skip(f"reference data {PHOTO} is missing")
    status = main(["invert", str(PHOTO), "--token", "_panda_", "--init", "giant panda", "--out", str(tmp_path),
                   "--model", str(tiny_sd), "--steps", "1", "--device", "cpu"])
    assert status == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--token/--init: init word 'giant panda' is 2 tokens" in errors[0]
    assert not (tmp_path / "learned_embeds.bin").exists()


def test_unwritable_out_is_refused_before_loading_anything(tmp_path, capsys):
    """The check runs before the models load: a model folder that does not exist is never reached."""
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "photo.png").write_bytes(b"")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "sub" / "out"):
        status = main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out", str(out),
                       "--model", str(tmp_path / "no-model"), "--steps", "1", "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and len(err) == 1, err
        assert "a-file" in err[0] and ("is a file" in err[0] or "is not a writable folder" in err[0]), err[0]
    assert (tmp_path / "a-file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file", "photo.png"]


def test_missing_torchvision_is_one_line_before_anything(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    hidden = "torchvision"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a))
    (tmp_path / "photo.png").write_bytes(b"")
    status = main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out",
                   str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    from animate124.tools.host_check import install_hint

    assert status == 1 and len(err) == 1 and err[0].endswith(install_hint(None, "tools"))
    assert str(Path(__file__).resolve().parents[2]) in err[0]  # an absolute path: it works from any folder
    assert not (tmp_path / "out").exists()
