"""`animate124 preprocess`: keep a real alpha, recentre with the border ratio, depth normalised inside the mask."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animate124.tools import preprocess
from animate124.tools.cli import main

EXAMPLES = Path(os.environ.get("A124_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "examples"
PANDA = EXAMPLES / "panda-dance" / "rgba.png"

pytestmark = pytest.mark.unit


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"reference data {path} is missing (expected ../shared/data beside the project root)")


def _bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > 0)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory) -> Path:
    """A tiny random DPT saved with save_pretrained (model + image processor), loaded back by the tool."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_dpt")
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_rgba_input_is_kept_recentred_and_padded(tmp_path):
    _need(PANDA)
    source = Image.open(PANDA)
    assert source.mode == "RGBA" and preprocess.has_real_alpha(source)
    size, border = 128, 0.2
    args = ["preprocess", str(PANDA), "--out", str(tmp_path), "--size", str(size), "--border-ratio", str(border)]
    status = main(args + ["--no-depth"])
    assert status == 0
    out = np.asarray(Image.open(tmp_path / "rgba.png"))
    assert out.shape == (size, size, 4)
    assert not (tmp_path / "depth.png").exists()
    preview = np.asarray(Image.open(tmp_path / "preview.png"))
    assert preview.shape == (size, 2 * size, 3)

    # 1. the longer bbox side is size * (1 - border) = 102.4 -> 102 px (+-1 for resampling at the edge)
    y0, y1, x0, x1 = _bbox(out[..., 3])
    assert abs(max(y1 - y0, x1 - x0) - size * (1 - border)) <= 1.5
    # 2. the bbox centre is the image centre (64, 64) within a pixel
    assert abs((y0 + y1) / 2 - size / 2) <= 1.0 and abs((x0 + x1) / 2 - size / 2) <= 1.0
    # 3. the alpha is the source alpha, only cropped and resized (compare with PIL on the alpha channel alone)
    alpha = np.asarray(source)[..., 3]
    sy0, sy1, sx0, sx1 = _bbox(alpha)
    scale = size * (1 - border) / max(sy1 - sy0, sx1 - sx0)
    new_w, new_h = round((sx1 - sx0) * scale), round((sy1 - sy0) * scale)
    expected = np.asarray(Image.fromarray(alpha[sy0:sy1, sx0:sx1]).resize((new_w, new_h), Image.Resampling.LANCZOS))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    got = out[top : top + new_h, left : left + new_w, 3].astype(np.int32)
    assert np.abs(got - expected.astype(np.int32)).max() <= 1
    assert out[..., 3].sum() == got.sum()  # nothing outside the pasted crop


def test_recentre_numbers_on_a_synthetic_rectangle():
    # a 20 x 40 opaque rectangle off-centre in a 100 x 200 image; size 100, border 0.5 -> 25 x 50, centred
    rgba = np.zeros((100, 200, 4), np.uint8)
    rgba[10:30, 150:190] = 255
    out = preprocess.recentre(rgba, 100, 0.5)
    assert _bbox(out[..., 3]) == (37, 62, 25, 75)
    assert out[..., 3].max() == 255


def test_rgb_input_without_rembg_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    _need(EXAMPLES / "panda-dance" / "image.jpg")
    monkeypatch.setitem(sys.modules, "rembg", None)  # makes `import rembg` raise ImportError
    status = main(["preprocess", str(EXAMPLES / "panda-dance" / "image.jpg"), "--out", str(tmp_path), "--no-depth"])
    assert status == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (the rest is tqdm)
    assert len(errors) == 1
    assert errors[0].startswith("animate124 preprocess: error:")
    assert "rembg" in errors[0] and "RGBA" in errors[0] and "pip install" in errors[0]
    assert not (tmp_path / "rgba.png").exists()


def test_rgb_with_opaque_alpha_is_not_a_real_alpha():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    assert not preprocess.has_real_alpha(image)
    called = []

    def fake_background(rgb):
        called.append(rgb.mode)
        out = rgb.convert("RGBA")
        out.putpixel((0, 0), (0, 0, 0, 0))
        return out

    result = preprocess.preprocess_image(image, 16, 0.2, background_fn=fake_background)
    assert called == ["RGB"] and result.rgba.shape == (16, 16, 4)


def test_depth_from_tiny_model_is_zero_outside_and_spans_inside(tmp_path, tiny_depth_model):
    _need(PANDA)
    status = main(["preprocess", str(PANDA), "--out", str(tmp_path), "--size", "96", "--depth-model",
                   str(tiny_depth_model), "--device", "cpu"])
    assert status == 0
    rgba = np.asarray(Image.open(tmp_path / "rgba.png"))
    depth = np.asarray(Image.open(tmp_path / "depth.png"))
    assert depth.shape == (96, 96) and depth.dtype == np.uint8
    mask = rgba[..., 3] > 0
    assert depth[~mask].max() == 0
    assert depth[mask].min() == 0 and depth[mask].max() == 255
    assert np.asarray(Image.open(tmp_path / "preview.png")).shape == (96, 288, 3)


def test_normalise_depth_hand_computed():
    depth = np.array([[1.0, 2.0], [3.0, 9.0]], np.float32)
    mask = np.array([[True, True], [True, False]])
    # inside: 1, 2, 3 -> 0, 127.5, 255 (rounded half to even: 128), outside 0
    assert preprocess.normalise_depth(depth, mask).tolist() == [[0, 128], [255, 0]]


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    _need(PANDA)
    (tmp_path / "rgba.png").write_bytes(b"user file")
    assert main(["preprocess", str(PANDA), "--out", str(tmp_path), "--no-depth", "--size", "32"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "rgba.png").read_bytes() == b"user file"
    assert main(["preprocess", str(PANDA), "--out", str(tmp_path), "--no-depth", "--size", "32", "--overwrite"]) == 0
    assert Image.open(tmp_path / "rgba.png").size == (32, 32)


def test_bad_border_ratio_is_a_clear_error(tmp_path, capsys):
    _need(PANDA)
    assert main(["preprocess", str(PANDA), "--out", str(tmp_path), "--no-depth", "--border-ratio", "1.5"]) == 1
    assert "--border-ratio" in capsys.readouterr().err


def test_rembg_path_and_offline_error(tmp_path, monkeypatch, capsys):
    """rembg's API as called (new_session, remove) via a stand-in module; offline download failure -> one line."""
    import types

    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (90, 60, 30)).save(photo)

    def remove(image, session):
        assert session == "session" and image.mode == "RGB"
        out = image.convert("RGBA")
        alpha = np.zeros((30, 40), np.uint8)
        alpha[5:15, 10:30] = 255  # a 10 x 20 object
        out.putalpha(Image.fromarray(alpha))
        return out

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=lambda: "session", remove=remove))
    monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2net"))
    (tmp_path / "u2net").mkdir()
    (tmp_path / "u2net" / "u2net.onnx").write_bytes(b"rembg's model, downloaded once")
    assert main(["preprocess", str(photo), "--out", str(tmp_path / "a"), "--size", "40", "--no-depth"]) == 0
    alpha = np.asarray(Image.open(tmp_path / "a" / "rgba.png"))[..., 3]
    assert _bbox(alpha) == (12, 28, 4, 36)  # 20 -> 32 px wide (border 0.2), 10 -> 16 px high, centred

    def offline():
        raise ConnectionError("Failed to download u2net.onnx")

    monkeypatch.setitem(sys.modules, "rembg", types.SimpleNamespace(new_session=offline, remove=remove))
    assert main(["preprocess", str(photo), "--out", str(tmp_path / "b"), "--no-depth"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "ConnectionError" in errors[0] and "supply an RGBA image" in errors[0]


def test_exif_rotation_is_applied(tmp_path):
    # a 60 x 20 (wide) opaque bar, stored with EXIF orientation 6 (rotate 90 degrees): the output bar is tall
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (10, 30, 70, 50))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.png", exif=exif)
    assert main(["preprocess", str(tmp_path / "rotated.png"), "--out", str(tmp_path / "o"), "--size", "64",
                 "--border-ratio", "0", "--no-depth"]) == 0
    y0, y1, x0, x1 = _bbox(np.asarray(Image.open(tmp_path / "o" / "rgba.png"))[..., 3])
    assert (y1 - y0, x1 - x0) == (64, 21)  # 60 x 20 scaled by 64/60, standing up


# ---- bad files and folders: one line, checked before any model loads, nothing of the user's replaced -----------------


def _no_depth_model(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the depth model was loaded before the input was checked")

    monkeypatch.setattr(preprocess, "estimate_depth", loaded)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_all_transparent_image_fails_before_the_depth_model(tmp_path, monkeypatch, capsys):
    _no_depth_model(monkeypatch)
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert main(["preprocess", str(tmp_path / "clear.png"), "--out", str(tmp_path / "o")]) == 1
    assert _error_line(capsys) == ("animate124 preprocess: error: the mask is empty (alpha is 0 everywhere): supply an "
                                   "RGBA image whose object is opaque")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content,what", [(b"not an image at all", "is not an image Pillow can read"),
                                          (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "is not an image Pillow can read")])
def test_not_an_image(tmp_path, monkeypatch, capsys, content, what):
    _no_depth_model(monkeypatch)
    (tmp_path / "photo.png").write_bytes(content)
    assert main(["preprocess", str(tmp_path / "photo.png"), "--out", str(tmp_path / "o")]) == 1
    line = _error_line(capsys)
    assert what in line and line.endswith("give a PNG, JPEG or WebP"), line
    assert not (tmp_path / "o").exists()


def test_image_is_a_folder(tmp_path, monkeypatch, capsys):
    _no_depth_model(monkeypatch)
    assert main(["preprocess", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "is a folder: give the path of one photo" in _error_line(capsys)


def test_out_is_a_file(tmp_path, monkeypatch, capsys):
    _no_depth_model(monkeypatch)
    Image.new("RGBA", (20, 20), (255, 0, 0, 255)).save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("the user's notes")
    assert main(["preprocess", str(tmp_path / "in.png"), "--out", str(tmp_path / "notes.txt")]) == 1
    assert _error_line(capsys).endswith("notes.txt' is a file: give a folder for rgba.png, preview.png, depth.png")
    assert (tmp_path / "notes.txt").read_text() == "the user's notes"


def test_out_folder_with_the_users_files(tmp_path, capsys):
    """Other files in --out are never touched; ours are replaced only with --overwrite, then completely."""
    image = np.zeros((20, 20, 4), np.uint8)
    image[5:15, 5:15] = (10, 200, 30, 255)
    Image.fromarray(image, "RGBA").save(tmp_path / "in.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"the user's photo")
    (out / "preview.png").write_bytes(b"the user's own preview")
    assert main(["preprocess", str(tmp_path / "in.png"), "--out", str(out), "--no-depth", "--size", "16"]) == 1
    assert "preview.png already exist(s): pass --overwrite" in _error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["photo.jpg", "preview.png"]
    assert (out / "preview.png").read_bytes() == b"the user's own preview"
    assert main(["preprocess", str(tmp_path / "in.png"), "--out", str(out), "--no-depth", "--size", "16",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.jpg", "preview.png", "rgba.png"]  # no temp files left
    assert (out / "photo.jpg").read_bytes() == b"the user's photo"
    assert Image.open(out / "preview.png").size == (32, 16)


def _through_tool(tmp_path, image_path, size=16) -> np.ndarray:
    out = tmp_path / f"out-{image_path.stem}"
    assert main(["preprocess", str(image_path), "--out", str(out), "--no-depth", "--size", str(size),
                 "--border-ratio", "0.5"]) == 0
    return np.asarray(Image.open(out / "rgba.png"))


def test_unusual_modes_give_correct_rgba(tmp_path):
    """Palette with transparency, grayscale + alpha, 16-bit grayscale: colours and alpha as the 8-bit RGBA image."""
    # palette: index 0 transparent, index 1 red; the object is the 8x8 centre of a 16x16 image
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    pal.paste(1, (4, 4, 12, 12))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    rgba = _through_tool(tmp_path, tmp_path / "palette.png")
    assert rgba[8, 8].tolist() == [255, 0, 0, 255] and rgba[0, 0, 3] == 0
    # grayscale + alpha
    la = np.zeros((16, 16, 2), np.uint8)
    la[4:12, 4:12] = (90, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgba = _through_tool(tmp_path, tmp_path / "la.png")
    assert rgba[8, 8].tolist() == [90, 90, 90, 255] and rgba[0, 0, 3] == 0


def test_16_bit_and_float_grayscale_are_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], np.uint16)
    image = Image.fromarray(values)  # mode I;16
    assert image.mode.startswith("I")
    assert np.asarray(preprocess.normalise_mode(image))[0, :, 0].tolist() == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(preprocess.normalise_mode(as_float))[0, :, 0].tolist() == [0, 128, 255]
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert preprocess.normalise_mode(cmyk).mode == "RGB"


def test_16_bit_rgba_png(tmp_path):
    """A 64-bit RGBA PNG (16 bits per channel, written with OpenCV) is read as its 8-bit equivalent."""
    cv2 = pytest.importorskip("cv2")
    bgra = np.zeros((16, 16, 4), np.uint16)
    bgra[4:12, 4:12] = (0, 257 * 100, 65535, 65535)  # B, G, R, A
    cv2.imwrite(str(tmp_path / "deep.png"), bgra)
    rgba = _through_tool(tmp_path, tmp_path / "deep.png")
    assert rgba[8, 8].tolist() == [255, 100, 0, 255] and rgba[0, 0, 3] == 0


def test_the_default_depth_model_is_one_this_transformers_can_load():
    """Depth Anything V2 needs a class transformers 4.28.1 (threestudio's pin) lacks: there the default is DPT-Hybrid,
    whose class both stacks have."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES as known

    model = preprocess.default_depth_model()
    kind = {v: k for k, v in preprocess.DEPTH_MODELS.items()}[model]
    assert kind in known
    new_enough = hasattr(transformers, "DepthAnythingForDepthEstimation")
    assert model == ("depth-anything/Depth-Anything-V2-Small-hf" if new_enough else "Intel/dpt-hybrid-midas")
    assert "dpt" in known  # the fallback loads on every transformers this project supports
