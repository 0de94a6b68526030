"""Prepare one photo for Animate124: cut out the object, recentre it on a square, estimate its depth.

Writes three files into --out:
  rgba.png     the object on a transparent square, SIZE x SIZE; its alpha is the mask
  depth.png    8-bit relative depth as the depth model predicts it (near = bright for DPT / Depth Anything), min-max
               normalised to [0, 255] inside the mask and 0 outside
  preview.png  [image on white | mask | depth] side by side

An input with a real alpha channel (some pixel below 255) is used as is. Otherwise the background is removed with
rembg (the ``tools`` extra: bash install.sh THREESTUDIO tools; it downloads its model on first use). Depth comes from a transformers
depth-estimation model (--depth-model: a hub id or a local folder saved with save_pretrained); it sees the original
photo, background included, and its prediction is cropped and scaled exactly like the image. The default depends on
the installed transformers: Depth Anything V2 Small where it has that model (4.45 and later), DPT-Hybrid (MiDaS 3.0)
on older ones, threestudio's pinned 4.28.1 included.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from animate124.core.io.atomic_io import save_with
from animate124.core.io.images import normalise_mode
from animate124.tools.cli import ToolError, check_out_folder
from animate124.tools.host_check import install_hint

__all__ = [
    "DEFAULT_DEPTH_MODEL",
    "default_depth_model",
    "Preprocessed",
    "preprocess_image",
    "normalise_mode",
    "cut_out",
    "has_real_alpha",
    "remove_background",
    "recentre",
    "estimate_depth",
    "normalise_depth",
    "add_arguments",
    "run",
]

DEPTH_MODELS = {"depth_anything": "depth-anything/Depth-Anything-V2-Small-hf", "dpt": "Intel/dpt-hybrid-midas"}
"""transformers model type -> the default depth model of that type, in order of preference."""


def default_depth_model() -> str:
    """The first of ``DEPTH_MODELS`` whose model type the installed transformers can load."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES as known
    except ImportError:
        known = {}
    return next((model for kind, model in DEPTH_MODELS.items() if kind in known), DEPTH_MODELS["dpt"])


DEFAULT_DEPTH_MODEL = DEPTH_MODELS["depth_anything"]
"""The default on current transformers (:func:`default_depth_model` picks per stack)."""


@dataclass
class Preprocessed:
    """Outputs of :func:`preprocess_image` (uint8 arrays)."""

    rgba: np.ndarray  # (S, S, 4)
    depth: np.ndarray | None  # (S, S), 0 outside the mask
    preview: np.ndarray  # (S, 2S or 3S, 3)


def preprocess_image(
    image,
    size: int = 512,
    border_ratio: float = 0.2,
    depth_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    background_fn: Callable | None = None,
) -> Preprocessed:
    """Cut out, recentre and (optionally) estimate depth for one PIL image.

    Args:
        image: a PIL image, any mode (16-bit, palette, grayscale + alpha, ... are normalised by
            :func:`normalise_mode`). With a real alpha channel it is kept; otherwise ``background_fn`` (default
            :func:`remove_background`, i.e. rembg) produces the RGBA.
        size: side of the square output in pixels.
        border_ratio: fraction of ``size`` left empty around the object: its longer bbox side becomes
            ``size * (1 - border_ratio)``.
        depth_fn: maps the original RGB photo (H, W, 3) uint8 to a float depth map (H, W); None skips depth.
        background_fn: maps an RGB PIL image to an RGBA PIL image of the same size.
    """
    check_geometry(size, border_ratio)
    image = normalise_mode(image)
    return finish(image, cut_out(image, background_fn), size, border_ratio, depth_fn)


def check_geometry(size: int, border_ratio: float) -> None:
    if size < 8:
        raise ToolError(f"--size {size} is too small: use at least 8 (512 is the default)")
    if not 0.0 <= border_ratio < 1.0:
        raise ToolError(f"--border-ratio {border_ratio} is outside [0, 1): use e.g. 0.2 (0 = object touches the edge)")


def cut_out(image, background_fn: Callable | None = None) -> np.ndarray:
    """The (H, W, 4) uint8 RGBA of an RGB/RGBA image (see :func:`normalise_mode`): its own alpha when real,
    otherwise ``background_fn`` (rembg). Raises ToolError when the object is empty (alpha 0 everywhere)."""
    if has_real_alpha(image):
        rgba_full = image.convert("RGBA")
    else:
        rgba_full = (background_fn or remove_background)(image.convert("RGB")).convert("RGBA")
    rgba_full = np.asarray(rgba_full)
    if not (rgba_full[..., 3] > 0).any():
        raise ToolError("the mask is empty (alpha is 0 everywhere): supply an RGBA image whose object is opaque")
    return rgba_full


def finish(image, rgba_full: np.ndarray, size: int, border_ratio: float,
           depth_fn: Callable[[np.ndarray], np.ndarray] | None) -> Preprocessed:
    """Recentre the cut-out and its depth (computed on the original photo) with the same crop, scale and offset."""
    rgba = recentre(rgba_full, size, border_ratio)
    mask = rgba[..., 3] > 0
    depth = None
    if depth_fn is not None:
        raw = np.asarray(depth_fn(np.array(image.convert("RGB"))), dtype=np.float32)
        depth = normalise_depth(recentre(raw, size, border_ratio, bbox_from=rgba_full[..., 3]), mask)
    return Preprocessed(rgba=rgba, depth=depth, preview=_preview(rgba, depth))


def has_real_alpha(image) -> bool:
    """True when ``image`` has an alpha channel (or palette transparency) with at least one pixel below 255."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        return bool((alpha < 255).any())
    return False


def rembg_model_path() -> Path:
    """Where rembg keeps its default model (u2net): ``$U2NET_HOME``, else ``$XDG_DATA_HOME/.u2net``, else
    ``~/.u2net``."""
    home = os.getenv("U2NET_HOME", os.path.join(os.getenv("XDG_DATA_HOME", "~"), ".u2net"))
    return Path(os.path.expanduser(home)) / "u2net.onnx"


def check_background_removal() -> None:
    """Before rembg is imported: it is installed, and its model is on disk or can be downloaded. Offline, rembg's
    download retries for minutes before failing; this says why in a second."""
    if not (sys.modules.get("rembg") if "rembg" in sys.modules else importlib.util.find_spec("rembg")):
        raise ToolError(
            "the image has no alpha channel and rembg is not installed: supply an RGBA image with the background "
            'removed, or pip install -e ".[tools]" in this repo (rembg with its onnxruntime backend)')
    model = rembg_model_path()
    if model.is_file():
        return
    offline = _offline_reason("github.com")  # rembg downloads its model from GitHub releases
    if offline:
        raise ToolError(
            f"the image has no alpha channel and rembg's model {model} is not downloaded ({offline}): supply an RGBA "
            "image with the background removed, or run preprocess once with network access (the model goes to "
            "$U2NET_HOME, default ~/.u2net)")


def _offline_reason(host: str, timeout: float = 3.0) -> str | None:
    """Why ``host`` cannot be downloaded from, or None: HF_HUB_OFFLINE is set, or a direct connection fails (not
    tried behind a proxy). The lookup runs in a thread so that a slow resolver cannot stall the check."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    result: list = []

    def connect() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(None)
        except OSError as error:
            result.append(f"{host} cannot be reached: {type(error).__name__}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0] if result else f"{host} did not answer within {timeout:g} s"


def remove_background(image):
    """RGB PIL image -> RGBA PIL image with rembg (imported here: it is optional)."""
    try:
        import rembg
    except ImportError as error:
        raise ToolError(
            f"the image has no alpha channel and rembg is not installed ({error}): supply an RGBA image with the "
            f"background removed, or install the tools extra (rembg with its onnxruntime backend): {install_hint(None, 'tools')}"
        ) from error
    try:
        session = rembg.new_session()
        return rembg.remove(image, session=session)
    except Exception as error:  # rembg downloads its model on first use; offline this fails in many ways
        raise ToolError(
            f"rembg could not run ({type(error).__name__}: {error}): supply an RGBA image with the background "
            "removed, or allow rembg to download its model once (it needs network access on first use)"
        ) from error


def recentre(array: np.ndarray, size: int, border_ratio: float, bbox_from: np.ndarray | None = None) -> np.ndarray:
    """Crop ``array`` to the bbox of its mask, scale the longer side to ``size*(1-border_ratio)``, centre on a square.

    Args:
        array: (H, W, 4) uint8 RGBA (the mask is its alpha > 0) or (H, W) float32 (then ``bbox_from`` gives the mask).
        bbox_from: (H, W) array whose nonzero pixels define the bbox; default ``array[..., 3]``.
    Returns:
        (size, size, 4) uint8 or (size, size) float32; zeros (transparent) outside the pasted crop.
    """
    from PIL import Image

    alpha = array[..., 3] if bbox_from is None else bbox_from
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    h, w = y1 - y0, x1 - x0
    scale = size * (1.0 - border_ratio) / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    crop = np.ascontiguousarray(array[y0:y1, x0:x1])
    if crop.dtype == np.uint8:
        # PIL resizes RGBA with premultiplied alpha, so transparent pixels do not bleed their colour into the edge
        resized = np.asarray(Image.fromarray(crop, "RGBA").resize((new_w, new_h), Image.Resampling.LANCZOS))
    else:
        resized = np.asarray(Image.fromarray(crop.astype(np.float32), "F").resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((size, size) + array.shape[2:], dtype=resized.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out


def estimate_depth(model_id: str | None = None, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """Load a transformers depth-estimation model (default :func:`default_depth_model`); return a function
    (H, W, 3) uint8 -> (H, W) float32 depth."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    model_id = model_id or default_depth_model()
    try:
        processor = AutoImageProcessor.from_pretrained(model_id)
        model = AutoModelForDepthEstimation.from_pretrained(model_id).to(device).eval()
    except (OSError, ValueError) as error:
        raise ToolError(
            f"could not load the depth model --depth-model {model_id!r} ({type(error).__name__}): give a local folder "
            "saved with save_pretrained, allow the download once, or pass --no-depth (offline, HF_HUB_OFFLINE=1 skips "
            "the download retries)"
        ) from error

    @torch.no_grad()
    def predict(rgb: np.ndarray) -> np.ndarray:
        inputs = processor(images=rgb, return_tensors="pt").to(device)
        predicted = model(**inputs).predicted_depth  # (1, h, w)
        full = torch.nn.functional.interpolate(
            predicted[:, None].float(), size=rgb.shape[:2], mode="bicubic", align_corners=False
        )
        return full[0, 0].cpu().numpy()

    return predict


def normalise_depth(depth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Min-max normalise ``depth`` inside ``mask`` to [0, 255] uint8 (keeping the model's orientation); 0 outside."""
    out = np.zeros(depth.shape, dtype=np.uint8)
    inside = depth[mask]
    if inside.size == 0:
        return out
    lo, hi = float(inside.min()), float(inside.max())
    scaled = (inside - lo) / (hi - lo) if hi > lo else np.ones_like(inside)
    out[mask] = np.clip(np.round(scaled * 255.0), 0, 255).astype(np.uint8)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="input photo (RGB or RGBA; jpg, png, ...)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for rgba.png, depth.png, preview.png")
    parser.add_argument("--size", type=int, default=512, help="side of the square output in pixels (default 512)")
    parser.add_argument(
        "--border-ratio",
        type=float,
        default=0.2,
        help="empty border around the object as a fraction of --size (default 0.2)",
    )
    parser.add_argument(
        "--depth-model",
        default=None,
        help=f"transformers depth-estimation model: hub id or local folder (default: {DEPTH_MODELS['depth_anything']} "
        f"where the installed transformers has it (4.45 and later), else {DEPTH_MODELS['dpt']}, e.g. with "
        "threestudio's pinned 4.28.1)",
    )
    parser.add_argument("--no-depth", action="store_true", help="skip depth estimation (no depth.png)")
    parser.add_argument("--device", default=None, help="torch device for the depth model (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


OUTPUTS = ("rgba.png", "preview.png", "depth.png")


def run(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    # every input check before any model loads: a bad file must not wait for the depth model
    check_geometry(args.size, args.border_ratio)
    names = [n for n in OUTPUTS if not (args.no_depth and n == "depth.png")]
    check_out_folder(args.out, names, args.overwrite)
    stale = args.out / "depth.png" if args.no_depth and (args.out / "depth.png").exists() else None
    if stale and not args.overwrite:  # an earlier subject's depth map must not pair with this rgba.png
        raise ToolError(f"{stale} (an earlier depth map) would stay beside the new rgba.png, and --no-depth writes "
                        "none: pass --overwrite to remove it, or choose another --out")
    image = normalise_mode(open_image(args.image))
    if not has_real_alpha(image):
        check_background_removal()
    if not args.no_depth:
        args.depth_model = args.depth_model or default_depth_model()  # the one this transformers can load
        check_depth_model(args.depth_model)
    rgba_full = cut_out(image)  # rembg when there is no real alpha; fails here on an empty mask
    with tqdm(total=3, desc="preprocess", unit="step") as bar:
        depth_fn = None
        if not args.no_depth:
            depth_fn = estimate_depth(args.depth_model, device=args.device or _default_device())
        bar.update()
        result = finish(image, rgba_full, args.size, args.border_ratio, depth_fn)
        bar.update()
        args.out.mkdir(parents=True, exist_ok=True)
        arrays = {"rgba.png": (result.rgba, "RGBA"), "preview.png": (result.preview, "RGB"),
                  "depth.png": (result.depth, "L")}
        for name in names:  # each file complete or absent: a temporary file renamed into place
            array, mode = arrays[name]
            save_with(args.out / name, lambda tmp, a=array, m=mode: Image.fromarray(a, m).save(tmp, format="PNG"))
        if stale:
            stale.unlink()  # after the new files are in place: a failed run leaves the folder as it was
        bar.update()
    print(f"wrote {', '.join(str(args.out / n) for n in names)}" + (f"; removed the earlier {stale}" if stale else ""))
    return 0


def check_depth_model(model_id: str) -> None:
    """Offline, the depth model must be a local folder or in the hub cache (otherwise loading it fails only after
    the background removal)."""
    if os.path.isdir(os.path.expanduser(model_id)) or os.environ.get("HF_HUB_OFFLINE", "") in ("", "0"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a hub id: the loader says so
        cached = False
    if not cached:
        raise ToolError(f"--depth-model {model_id!r} is neither a local folder nor in the hub cache, and "
                        "HF_HUB_OFFLINE is set: download it once, give a local folder saved with save_pretrained, or "
                        "pass --no-depth")


def open_image(path: Path):
    """The decoded image, EXIF rotation applied; one ToolError line when it is missing or not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.is_dir():
        raise ToolError(f"IMAGE {str(path)!r} is a folder: give the path of one photo")
    if not path.is_file():
        raise ToolError(f"IMAGE {str(path)!r} does not exist: give the path of a photo")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ToolError(f"IMAGE {str(path)!r} is not an image Pillow can read ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}): give a PNG, JPEG or WebP") from None
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
    return ImageOps.exif_transpose(image)  # phone photos: apply the EXIF rotation


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _preview(rgba: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    on_white = (rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    panels = [on_white, np.repeat(rgba[..., 3:], 3, axis=2)]
    if depth is not None:
        panels.append(np.repeat(depth[..., None], 3, axis=2))
    return np.concatenate(panels, axis=1)
