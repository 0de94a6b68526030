"""Assets of the smoke run (``configs/animate124-smoke.yaml``): the tiny random models, an RGBA subject and a
textual-inversion embedding, written once into one cache folder outside the checkout (:func:`tiny_models_dir`).
The config reaches this through the ``${a124_tiny_models:}`` and ``${a124_smoke_assets:DIR}`` resolvers
(:func:`register_smoke_resolver`, which the extension's ``__init__.py`` calls): threestudio resolves a config before it
builds anything, so resolving the second is the one point where the models can be made before the data module reads
the image. ``animate124 make-tiny-models`` makes the models alone.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from animate124.testing import tiny_models

MARKER = ".complete"
FORMAT = "published-layouts-1"
"""Written into the marker: a folder made by an older version (other weight formats) is made again."""
TINY_MODELS_ENV = "A124_TINY_MODELS"


def tiny_models_dir() -> str:
    """Where the smoke run keeps its tiny models: ``$A124_TINY_MODELS``, else ``animate124/tiny-models`` in the
    user's cache folder (``$XDG_CACHE_HOME``, default ``~/.cache``), so nothing is written into the checkout."""
    if os.environ.get(TINY_MODELS_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[TINY_MODELS_ENV]))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(cache, "animate124", "tiny-models")


def _ready(marker: str) -> bool:
    try:
        return Path(marker).read_text().strip() == FORMAT
    except OSError:
        return False


def register_smoke_resolver() -> None:
    """``${a124_tiny_models:}``: :func:`tiny_models_dir`; ``${a124_smoke_assets:DIR}``: make the smoke assets in DIR
    (once) and resolve to DIR (idempotent)."""
    import warnings

    from omegaconf import OmegaConf

    def resolve(out_dir: str) -> str:
        ensure_smoke_assets(out_dir)
        return out_dir

    with warnings.catch_warnings():  # omegaconf 2.4 renamed the function; 2.3 (threestudio's pin) has only this one
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver("a124_smoke_assets", resolve, replace=True)
        OmegaConf.register_new_resolver("a124_tiny_models", tiny_models_dir, replace=True)


def ensure_smoke_assets(out_dir: str, wait_s: float = 1.0) -> None:
    """Write every asset once: local rank 0 writes and then the marker file; other ranks wait for the marker."""
    marker = os.path.join(out_dir, MARKER)
    if _ready(marker):
        return
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        while not _ready(marker):
            time.sleep(wait_s)
        return
    from animate124.core.io.safe_files import foreign_folders, mark_made

    made_here = os.path.exists(marker)  # an earlier version's assets (other formats): ours to replace
    foreign = [] if made_here else foreign_folders([os.path.join(out_dir, kind) for kind in tiny_models.ALL_KINDS])
    if foreign:  # system.tiny_models_dir pointed at real models: never write over them
        raise ValueError(f"a124-smoke: system.tiny_models_dir={out_dir} holds {', '.join(map(str, foreign))}, which the "
                         "smoke config did not make: point system.tiny_models_dir at an empty folder (the smoke config "
                         "makes its tiny models there)")
    print(f"making tiny random models in {out_dir} (smoke run; about 20 s, once)")
    Path(marker).unlink(missing_ok=True)
    for path in tiny_models.make_tiny_models(out_dir, kinds=tiny_models.ALL_KINDS).values():
        mark_made(path)
    write_smoke_image(os.path.join(out_dir, "smoke_rgba.png"))
    write_smoke_embedding(os.path.join(out_dir, "smoke_embeds.safetensors"), os.path.join(out_dir, "sd"))
    Path(marker).write_text(FORMAT + "\n")


def write_smoke_image(path: str, size: int = 128) -> None:
    """A procedural RGBA subject: a light disc with two dark 'ears' and a red nose on a transparent background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    s = size / 128
    draw.ellipse([34 * s, 40 * s, 94 * s, 100 * s], fill=(235, 235, 235, 255))
    for x in (30, 78):
        draw.ellipse([x * s, 28 * s, (x + 20) * s, 48 * s], fill=(30, 30, 30, 255))
    draw.ellipse([50 * s, 62 * s, 78 * s, 80 * s], fill=(200, 60, 60, 255))
    img.save(path)


def write_smoke_embedding(path: str, sd_dir: str) -> None:
    """A seeded random textual-inversion embedding sized for the tiny SD text encoder."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    width = CLIPTextConfig.from_pretrained(os.path.join(sd_dir, "text_encoder")).hidden_size
    save_file({"_smoke_token_": torch.randn(width, generator=torch.Generator().manual_seed(0))}, path)
