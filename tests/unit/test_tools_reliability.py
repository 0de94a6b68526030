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
    assert err == [f"animate124 make-tiny-models: error: {user} already exist(s) and were not made by "
                   "make-tiny-models: choose another DIR, or pass --overwrite to replace them"]
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


def _snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_preprocess_no_depth_never_leaves_an_earlier_depth_map(tmp_path, capsys):
    """--no-depth beside an earlier subject's depth.png: refused without --overwrite (nothing changed); with it the
    stale map is removed once the new files are written."""
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "photo.png")
    image = Image.open(tmp_path / "photo.png")
    image.paste((200, 10, 10, 255), (4, 4, 12, 12))
    image.save(tmp_path / "photo.png")
    out = tmp_path / "o"
    out.mkdir()
    (out / "depth.png").write_bytes(b"the previous subject's depth")
    before = _snapshot(out)
    assert main(["preprocess", str(tmp_path / "photo.png"), "--out", str(out), "--no-depth", "--size", "16"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"animate124 preprocess: error: {out / 'depth.png'} (an earlier depth map) would stay beside the new rgba.png, "
        "and --no-depth writes none: pass --overwrite to remove it, or choose another --out"]
    assert _snapshot(out) == before
    assert main(["preprocess", str(tmp_path / "photo.png"), "--out", str(out), "--no-depth", "--size", "16",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["preview.png", "rgba.png"]
    assert f"removed the earlier {out / 'depth.png'}" in capsys.readouterr().out


class _Untouchable:
    """A stand-in for rembg that fails the test if the tool uses it."""

    def __getattr__(self, name):
        raise AssertionError(f"rembg.{name} used before the offline check")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "no network"])
def test_preprocess_offline_without_rembg_model_fails_at_once(tmp_path, monkeypatch, capsys, how):
    import sys
    import time

    from animate124.tools import preprocess

    monkeypatch.setitem(sys.modules, "rembg", _Untouchable())
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))  # no model there
    for key in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        why = "HF_HUB_OFFLINE is set"
    else:
        def refused(*args, **kwargs):
            raise ConnectionRefusedError("no route")

        monkeypatch.setattr(preprocess.socket, "create_connection", refused)
        why = "github.com cannot be reached: ConnectionRefusedError"
    Image.new("RGB", (16, 16), (90, 60, 30)).save(tmp_path / "photo.jpg")
    started = time.perf_counter()
    assert main(["preprocess", str(tmp_path / "photo.jpg"), "--out", str(tmp_path / "o"), "--no-depth"]) == 1
    assert time.perf_counter() - started < 10
    assert capsys.readouterr().err.strip().splitlines() == [
        f"animate124 preprocess: error: the image has no alpha channel and rembg's model "
        f"{tmp_path / 'u2net' / 'u2net.onnx'} is not downloaded ({why}): supply an RGBA image with the background "
        "removed, or run preprocess once with network access (the model goes to $U2NET_HOME, default ~/.u2net)"]
    assert not (tmp_path / "o").exists()


def test_preprocess_offline_depth_model_not_cached_fails_before_anything(tmp_path, monkeypatch, capsys):
    from animate124.tools import preprocess

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setattr(preprocess, "cut_out", _no_model)
    monkeypatch.setattr(preprocess, "estimate_depth", _no_model)
    Image.new("RGBA", (16, 16), (9, 9, 9, 128)).save(tmp_path / "photo.png")
    assert main(["preprocess", str(tmp_path / "photo.png"), "--out", str(tmp_path / "o"),
                 "--depth-model", "someone/depth-model"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "animate124 preprocess: error: --depth-model 'someone/depth-model' is neither a local folder nor in the hub "
        "cache, and HF_HUB_OFFLINE is set: download it once, give a local folder saved with save_pretrained, or pass "
        "--no-depth"]
    assert not (tmp_path / "o").exists()


def test_16_bit_png_is_scaled_by_its_bit_depth_not_its_values(tmp_path):
    """A 16-bit grayscale PNG whose values stay <= 255 is nearly black (255 / 65535 of full scale), never read as
    8-bit; a 16-bit full-scale one maps 65535 -> 255. The same reader serves preprocess, the data module and the
    preflight's image check."""
    import numpy as np

    from animate124.core.io.images import bit_depth, normalise_mode

    low = np.array([[0, 100, 255, 128 * 257]], np.uint16)
    Image.fromarray(low).save(tmp_path / "low16.png")
    image = Image.open(tmp_path / "low16.png")
    assert bit_depth(image) == 16
    # x * 255 / 65535, rounded: 100 -> 0.389 -> 0; 255 -> 0.992 -> 1; 32896 -> 128
    assert np.asarray(normalise_mode(image))[0, :, 0].tolist() == [0, 0, 1, 128]
    Image.fromarray(np.array([[0, 100, 255]], np.uint8)).save(tmp_path / "eight.png")
    assert np.asarray(normalise_mode(Image.open(tmp_path / "eight.png")))[0, :, 0].tolist() == [0, 100, 255]
    as_png_i = Image.open(tmp_path / "low16.png").convert("I")  # older Pillow: mode "I" for a 16-bit PNG
    as_png_i.format = "PNG"
    assert bit_depth(as_png_i) == 16
    Image.fromarray(np.array([[0, 255, 70000]], np.int32), "I").save(tmp_path / "deep.tif")
    tif = Image.open(tmp_path / "deep.tif")
    assert bit_depth(tif) == 32
    assert np.asarray(normalise_mode(tif))[0, :, 0].tolist() == [0, 0, 0]  # 70000 / (2^32 - 1) of full scale


def test_preprocess_reads_a_low_valued_16_bit_png_dark(tmp_path):
    import numpy as np

    gray = np.zeros((16, 16), np.uint16)  # value 0 is transparent; the object's 200 / 65535 is black, not light gray
    gray[4:12, 4:12] = 200
    Image.fromarray(gray).save(tmp_path / "g16.png", transparency=0)
    assert main(["preprocess", str(tmp_path / "g16.png"), "--out", str(tmp_path / "o"), "--no-depth",
                 "--size", "16", "--border-ratio", "0"]) == 0
    rgba = np.asarray(Image.open(tmp_path / "o" / "rgba.png"))
    assert rgba[8, 8].tolist() == [1, 1, 1, 255]  # round(200 * 255 / 65535) = 1


@pytest.fixture(scope="module")
def tokenizer_only_model(tmp_path_factory):
    """A model folder holding only CLIP's real tokenizer: enough for invert's checks, nothing to load after them."""
    from animate124.testing.tiny_models import make_clip_tokenizer

    folder = tmp_path_factory.mktemp("sd-tokenizer-only")
    make_clip_tokenizer(folder / "tokenizer")
    return folder


@pytest.mark.parametrize("token, init, message", [
    ("panda", "panda", "--token/--init: token 'panda' is already the word 'panda</w>' of the vocabulary: pick a new "
                       "string such as '_panda_'"),
    ("Panda", "panda", "--token/--init: token 'Panda' is already the word 'panda</w>' of the vocabulary: pick a new "
                       "string such as '_Panda_'"),
    ("_panda_", "giant panda", "--token/--init: init word 'giant panda' is 2 tokens ['giant</w>', 'panda</w>'], not "
                               "one: use a plain single word such as 'panda' (not the placeholder like '_panda_')"),
])
def test_invert_checks_token_and_init_with_the_tokenizer_alone(tmp_path, monkeypatch, capsys, tokenizer_only_model,
                                                               token, init, message):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    assert main(["invert", str(tmp_path / "photo.png"), "--token", token, "--init", init, "--out",
                 str(tmp_path / "out"), "--model", str(tokenizer_only_model), "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"animate124 invert: error: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"just text, not an image", b"\x89PNG\r\n\x1a\ntruncated"])
def test_invert_refuses_a_file_that_is_not_an_image_in_one_line(tmp_path, monkeypatch, capsys, content):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    monkeypatch.setattr("animate124.core.guidance.text_encoding.load_tokenizer", _no_model)
    (tmp_path / "photo.png").write_bytes(content)
    assert main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"animate124 invert: error: IMAGE {str(tmp_path / 'photo.png')!r} is "
                                               "not an image Pillow can read ("), err
    assert err[0].endswith("): give a PNG, JPEG or WebP")
    assert not (tmp_path / "out").exists()


def test_invert_model_without_a_tokenizer_is_one_line_before_the_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(invert, "load_sd_parts", _no_model)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "not-a-model").mkdir()
    assert main(["invert", str(tmp_path / "photo.png"), "--token", "_x_", "--init", "panda", "--out",
                 str(tmp_path / "out"), "--model", str(tmp_path / "not-a-model"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"animate124 invert: error: could not load the tokenizer of --model "
                                               f"{str(tmp_path / 'not-a-model')!r} ("), err


def test_smoke_assets_never_write_over_models_they_did_not_make(tmp_path):
    """The smoke config makes its tiny models in system.tiny_models_dir; pointed at a folder of real models it refuses
    before writing anything."""
    from animate124.testing.smoke_assets import ensure_smoke_assets

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("the user's model")
    with pytest.raises(ValueError) as info:
        ensure_smoke_assets(str(tmp_path))
    assert str(info.value) == (f"a124-smoke: system.tiny_models_dir={tmp_path} holds {tmp_path / 'sd'}, which the smoke "
                               "config did not make: point system.tiny_models_dir at an empty folder (the smoke config "
                               "makes its tiny models there)")
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["sd", "sd/model_index.json"]
