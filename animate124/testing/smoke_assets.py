"""Assets of the smoke run (``configs/animate124-smoke.yaml``): the tiny random models, an RGBA subject and a
textual-inversion embedding, written once into one folder. The config reaches this through the
``${a124_smoke_assets:DIR}`` resolver (:func:`register_smoke_resolver`, which the extension's ``__init__.py`` calls):
threestudio resolves a config before it builds anything, so resolving this interpolation is the one point where the
models can be made before the data module reads the image. ``animate124 make-tiny-models`` makes the models alone.
"""
from __future__ import annotations

import os
import time

import torch

from animate124.testing import tiny_models

MARKER = ".complete"


def register_smoke_resolver() -> None:
    """``${a124_smoke_assets:DIR}``: make the smoke assets in DIR (once) and resolve to DIR (idempotent)."""
    from omegaconf import OmegaConf

    def resolve(out_dir: str) -> str:
        ensure_smoke_assets(out_dir)
        return out_dir

    OmegaConf.register_new_resolver("a124_smoke_assets", resolve, replace=True)


def ensure_smoke_assets(out_dir: str, wait_s: float = 1.0) -> None:
    """Write every asset once: local rank 0 writes and then the marker file; other ranks wait for the marker."""
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        return
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        while not os.path.exists(marker):
            time.sleep(wait_s)
        return
    from animate124.core.io.safe_files import foreign_folders, mark_made

    foreign = foreign_folders([os.path.join(out_dir, kind) for kind in tiny_models.ALL_KINDS])
    if foreign:  # system.tiny_models_dir pointed at real models: never write over them
        raise ValueError(f"a124-smoke: system.tiny_models_dir={out_dir} holds {', '.join(map(str, foreign))}, which the "
                         "smoke config did not make: point system.tiny_models_dir at an empty folder (the smoke config "
                         "makes its tiny models there)")
    print(f"making tiny random models in {out_dir} (smoke run)")
    for path in tiny_models.make_tiny_models(out_dir, kinds=tiny_models.ALL_KINDS).values():
        mark_made(path)
    write_smoke_image(os.path.join(out_dir, "smoke_rgba.png"))
    write_smoke_embedding(os.path.join(out_dir, "smoke_embeds.safetensors"), os.path.join(out_dir, "sd"))
    open(marker, "w").close()


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
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    width = CLIPTextConfig.from_pretrained(os.path.join(sd_dir, "text_encoder")).hidden_size
    save_file({"_smoke_token_": torch.randn(width, generator=torch.Generator().manual_seed(0))}, path)
