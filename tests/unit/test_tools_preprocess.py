"""`animate124 preprocess`: keep a real alpha, recentre with the border ratio, depth normalised inside the mask."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from animate124.tools import preprocess
from animate124.tools.cli import main

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "data" / "examples"
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
