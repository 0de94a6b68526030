"""Learn a token for one image (textual inversion on Stable Diffusion 1.5).

Adds --token (e.g. _panda_) to the CLIP tokenizer, initialises its embedding from --init (one plain word, e.g. panda,
that the tokenizer keeps as a single token) and trains only that embedding row with the noise-prediction loss on
augmented crops of IMAGE (the photo, background included), prompted with templates like "a photo of a _panda_".
Everything else (U-Net, VAE, every other embedding row) stays bit-identical.

Defaults follow the upstream recipe: 3000 steps, batch 16, lr 1e-4 constant, AdamW (0.9, 0.999, weight decay 1e-2),
fp16 autocast on GPU, the RealFusion augmentations. Writes learned_embeds.safetensors and learned_embeds.bin
(the same {token: float32 tensor[dim]}; load the .bin with torch.load(path, weights_only=True)) and invert.json.
The loss and the loop live in animate124.core.guidance.textual_inversion (train_token); this command parses its arguments,
loads the models and the photo, and checks --out is writable before the first step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

from animate124.core.io.atomic_io import write_text
from animate124.tools.cli import ToolError, check_out_folder
from animate124.tools.host_check import install_hint

__all__ = ["DEFAULT_SD_MODEL", "load_sd_parts", "load_image", "add_arguments", "run"]

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def load_sd_parts(model: str, device: str, fp16: bool) -> dict:
    """Tokenizer, text encoder, VAE, U-Net and DDPM scheduler from a diffusers SD folder or hub id."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        parts = {
            "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
            "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
            "vae": AutoencoderKL.from_pretrained(model, subfolder="vae"),
            "unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
            "scheduler": DDPMScheduler.from_pretrained(model, subfolder="scheduler"),
        }
    except (OSError, ValueError) as error:
        raise ToolError(
            f"could not load Stable Diffusion from --model {model!r} ({type(error).__name__}): give a local diffusers "
            "folder (tokenizer/, text_encoder/, vae/, unet/, scheduler/) or allow the download once"
        ) from error
    # the text encoder stays float32 (it is trained); the frozen U-Net and VAE go to fp16 on GPU to save memory
    weight_dtype = torch.float16 if fp16 else torch.float32
    parts["text_encoder"].to(device).train()
    parts["vae"].to(device, dtype=weight_dtype).eval()
    parts["unet"].to(device, dtype=weight_dtype).eval()
    return parts


def load_image(path: Path) -> "torch.Tensor":
    """An image file as (3, H, W) float in [0, 1]; RGBA is composited on white (the photo is what upstream used).
    A missing file or one that is not an image is one ToolError line."""
    import numpy as np
    import torch
    from PIL import Image

    from animate124.core.io.images import normalise_mode
    from animate124.tools.preprocess import open_image

    image = normalise_mode(open_image(path))  # EXIF rotation applied; 16-bit, palette, gray + alpha as 8-bit RGB(A)
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", type=Path, metavar="IMAGE", help="the photo (background included, as upstream)")
    parser.add_argument("--token", required=True, help="new placeholder token to learn, e.g. _panda_")
    parser.add_argument("--init", required=True, help="one plain word (a single CLIP token) to start from, e.g. panda")
    parser.add_argument("--out", type=Path, required=True, help="output folder for learned_embeds.{safetensors,bin}")
    parser.add_argument(
        "--model",
        default=DEFAULT_SD_MODEL,
        help=f"Stable Diffusion 1.5 in diffusers layout: hub id or local folder (default {DEFAULT_SD_MODEL})",
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimisation steps (default 3000)")
    parser.add_argument("--batch-size", type=int, default=16, help="augmented crops per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-4, help="constant AdamW learning rate (default 1e-4)")
    parser.add_argument("--resolution", type=int, default=512, help="training crop size in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp16", "fp32"),
        default="auto",
        help="fp16 = frozen U-Net/VAE in half precision with autocast (CUDA only); auto = fp16 on CUDA, fp32 on CPU",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> int:
    import torch

    if not args.image.is_file():
        raise ToolError(f"IMAGE {str(args.image)!r} does not exist: give the path of the photo")
    for name in ("steps", "batch_size", "resolution"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise ToolError(f"--lr {args.lr} must be a positive number, e.g. 1e-4")
    if importlib.util.find_spec("torchvision") is None:
        raise ToolError(f"invert needs torchvision for its image augmentations: {install_hint(None, 'tools')}")
    outputs = [args.out / "learned_embeds.safetensors", args.out / "learned_embeds.bin", args.out / "invert.json"]
    check_out_folder(args.out, [o.name for o in outputs], args.overwrite)  # before training, not after
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fp16 = args.precision == "fp16" or (args.precision == "auto" and device.startswith("cuda"))
    if fp16 and not device.startswith("cuda"):
        raise ToolError(f"--precision fp16 needs a CUDA device, got --device {device}: use --precision fp32")
    from animate124.core.guidance.text_encoding import load_tokenizer
    from animate124.core.guidance.textual_inversion import check_placeholder_token, save_learned_embeds, train_token

    if args.seed is not None:
        torch.manual_seed(args.seed)
    image = load_image(args.image)  # a file that is not an image fails here, before SD loads
    try:  # the tokenizer alone decides --token / --init: seconds, not the minute the pipeline takes to load
        check_placeholder_token(load_tokenizer(args.model), args.token, args.init)
    except ValueError as error:
        raise ToolError(f"--token/--init: {error}") from error
    except OSError as error:
        raise ToolError(f"could not load the tokenizer of --model {args.model!r} ({type(error).__name__}): give a "
                        "local diffusers folder (tokenizer/, text_encoder/, vae/, unet/, scheduler/) or allow the "
                        "download once") from error
    parts = load_sd_parts(args.model, device, fp16)
    result = train_token(
        parts, image, args.token, args.init, args.steps, args.batch_size, args.lr,
        args.resolution, args.seed, mixed_precision=fp16,
    )
    save_learned_embeds(args.out, args.token, result.embedding)
    log = {
        "image": str(args.image), "token": args.token, "init": args.init, "model": args.model, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "resolution": args.resolution, "seed": args.seed,
        "precision": "fp16" if fp16 else "fp32", "losses": result.losses,
    }
    write_text(args.out / "invert.json", json.dumps(log, indent=1))
    tail = result.losses[-min(50, len(result.losses)):]
    print(f"wrote {outputs[0]} and {outputs[1]} (token {args.token!r}, mean loss of last {len(tail)} steps "
          f"{sum(tail) / len(tail):.4f})")
    return 0


