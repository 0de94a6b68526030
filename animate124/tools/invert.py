"""Learn a token for one image (textual inversion on Stable Diffusion 1.5).

Adds --token (e.g. _panda_) to the CLIP tokenizer, initialises its embedding from --init (one plain word, e.g. panda,
that the tokenizer keeps as a single token) and trains only that embedding row with the noise-prediction loss on
augmented crops of IMAGE (the photo, background included), prompted with templates like "a photo of a _panda_".
Everything else (U-Net, VAE, every other embedding row) stays bit-identical.

Defaults follow the upstream recipe: 3000 steps, batch 16, lr 1e-4 constant, AdamW (0.9, 0.999, weight decay 1e-2),
fp16 autocast on GPU, the RealFusion augmentations. Writes learned_embeds.safetensors and learned_embeds.bin
(the same {token: float32 tensor[dim]}; load the .bin with torch.load(path, weights_only=True)) and invert.json.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from animate124.core.atomic_io import save_with, write_text
from animate124.tools.cli import ToolError, check_out_folder

__all__ = [
    "DEFAULT_SD_MODEL",
    "OBJECT_TEMPLATES",
    "InversionResult",
    "add_placeholder_token",
    "augment_image",
    "train_token",
    "inversion_loss",
    "save_learned_embeds",
    "add_arguments",
    "run",
]

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# The imagenet "object" prompt templates used by textual inversion (Gal et al. 2022).
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


@dataclass
class InversionResult:
    """What :func:`train_token` returns: the learned row (float32, CPU) and the loss of every step."""

    token: str
    embedding: "torch.Tensor"  # (D,)  # noqa: F821
    losses: list[float] = field(default_factory=list)


def add_placeholder_token(tokenizer, text_encoder, token: str, init_word: str) -> int:
    """Add ``token`` to ``tokenizer``, grow ``text_encoder``'s embeddings, copy ``init_word``'s row; return its id.

    Raises ToolError if ``token`` is already in the vocabulary or ``init_word`` is not exactly one token.
    """
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise ToolError(
            f"--init {init_word!r} is {len(init_ids)} tokens {pieces}, not one: use a plain single word such as "
            "'panda' (not the placeholder like '_panda_')"
        )
    # a string that already is one token (a word like "panda" is "panda</w>") would be shadowed by the new token
    existing = token in tokenizer.get_vocab() or len(tokenizer.encode(token, add_special_tokens=False)) == 1
    if existing or tokenizer.add_tokens(token) == 0:
        raise ToolError(f"--token {token!r} already exists in the vocabulary: pick a new string such as '_{token}_'")
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with _no_grad():
        weight[token_id] = weight[init_ids[0]].clone()
    return token_id


def augment_image(image: "torch.Tensor", size: int, generator: "torch.Generator | None" = None) -> "torch.Tensor":
    """One random augmentation of a (3, H, W) image in [0, 1]; returns (3, size, size) in [-1, 1].

    The upstream (RealFusion) recipe, with every draw from ``generator``: resize + centre crop to 5/4 size; with
    p 0.75 rotate by U(-10, 10) degrees (white fill), centre crop 5/6 size and resize to size; RandomResizedCrop with
    area scale (0.85, 1.15) and ratio (3/4, 4/3); with p 0.75 colour jitter 0.04 (brightness, contrast, saturation,
    hue in random order); grayscale p 0.1; Gaussian blur (kernel 5, sigma U(0.1, 2)) p 0.1; horizontal flip p 0.5.
    """
    import torch
    from torchvision.transforms.v2 import functional as F

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    # 1. resize the shorter side to 5/4 size, centre crop a square
    big = int(size * 5 / 4)
    x = F.center_crop(F.resize(image, big, antialias=True), [big, big])
    # 2. rotate a little and crop inside the rotation so no fill shows
    if u() < 0.75:
        x = F.rotate(x, u(-10.0, 10.0), interpolation=F.InterpolationMode.BILINEAR, fill=1.0)
        x = F.resize(F.center_crop(x, [int(size * 5 / 6)] * 2), [size, size], antialias=True)
    # 3. random resized crop (scale > 1 is impossible in area: after 10 misses it falls back to the whole image)
    x = F.resized_crop(x, *_resized_crop_box(x.shape[-2:], generator), [size, size], antialias=True)
    # 4. photometric jitter, grayscale, blur, flip
    if u() < 0.75:
        for op in torch.randperm(4, generator=generator).tolist():
            if op == 0:
                x = F.adjust_brightness(x, u(0.96, 1.04))
            elif op == 1:
                x = F.adjust_contrast(x, u(0.96, 1.04))
            elif op == 2:
                x = F.adjust_saturation(x, u(0.96, 1.04))
            else:
                x = F.adjust_hue(x, u(-0.04, 0.04))
    if u() < 0.1:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if u() < 0.1:
        x = F.gaussian_blur(x, [5, 5], [u(0.1, 2.0)] * 2)
    if u() < 0.5:
        x = F.horizontal_flip(x)
    # Upstream's augmented path fed ToTensor() output in [0, 1] straight into the VAE, which expects [-1, 1]
    # (its non-augmented path does normalise). We normalise here.
    return x.clamp(0.0, 1.0) * 2.0 - 1.0


def inversion_loss(
    parts: dict,
    pixels: "torch.Tensor",
    input_ids: "torch.Tensor",
    generator: "torch.Generator | None" = None,
) -> "torch.Tensor":
    """Noise-prediction MSE of the frozen U-Net, conditioned on the text encoder's output for ``input_ids``.

    Args:
        parts: dict with "text_encoder", "vae", "unet", "scheduler" (diffusers / transformers objects).
        pixels: (B, 3, H, W) images in [-1, 1].
        input_ids: (B, 77) token ids.
        generator: for the VAE sample, the noise and the timesteps (on the latents' device).
    """
    import torch

    vae, unet, scheduler = parts["vae"], parts["unet"], parts["scheduler"]
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
        latents = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, posterior.mean)
        latents = latents * vae.config.scaling_factor
    noise = _randn(latents.shape, generator, latents)
    draw_device = generator.device if generator is not None else latents.device
    steps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=draw_device
    ).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    hidden = parts["text_encoder"](input_ids)[0].to(unet.dtype)
    prediction = unet(noisy, steps, hidden).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, steps)
    else:
        target = noise
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")


def train_token(
    parts: dict,
    image: "torch.Tensor",
    token: str,
    init_word: str,
    steps: int = 3000,
    batch_size: int = 16,
    lr: float = 1e-4,
    resolution: int = 512,
    seed: int | None = 0,
    mixed_precision: bool = False,
    progress: bool = True,
    overfit_one_batch: bool = False,
) -> InversionResult:
    """Textual inversion: train the embedding row of ``token`` and nothing else.

    Args:
        parts: dict with "tokenizer", "text_encoder", "vae", "unet", "scheduler"; all on one device. The tokenizer
            and the text encoder's embedding matrix are modified in place (one row added).
        image: (3, H, W) in [0, 1], on CPU.
        mixed_precision: fp16 autocast for the U-Net/VAE forward (CUDA only) with loss scaling.
        overfit_one_batch: debugging aid: every step reuses the first step's crops, prompts, noise and timesteps,
            so the loss curve shows the optimisation alone (it must fall); needs ``seed``.
    """
    import torch
    from tqdm import tqdm

    if overfit_one_batch and seed is None:
        raise ValueError("train_token: overfit_one_batch=True needs a seed (it replays the first step's draws)")
    tokenizer, text_encoder = parts["tokenizer"], parts["text_encoder"]
    device = next(text_encoder.parameters()).device
    token_id = add_placeholder_token(tokenizer, text_encoder, token, init_word)
    # 1. freeze everything but the embedding matrix; keep a copy to restore every other row after each step
    for module in (parts["vae"], parts["unet"], text_encoder):
        module.requires_grad_(False)
    embeddings = text_encoder.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    original = embeddings.detach().clone()
    keep = torch.ones(embeddings.shape[0], dtype=torch.bool, device=device)
    keep[token_id] = False
    optimizer = torch.optim.AdamW([embeddings], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed_precision)
    cpu_gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dev_gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    losses: list[float] = []
    # 2. the loop: a fresh augmented batch and template prompts each step, constant learning rate
    for step in tqdm(range(steps), desc="invert", unit="step", disable=not progress):
        if step == 0 or not overfit_one_batch:
            pixels = torch.stack([augment_image(image, resolution, cpu_gen) for _ in range(batch_size)]).to(device)
            templates = torch.randint(len(OBJECT_TEMPLATES), (batch_size,), generator=cpu_gen).tolist()
            prompts = [OBJECT_TEMPLATES[i].format(token) for i in templates]
            input_ids = tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
        if overfit_one_batch:
            dev_gen.manual_seed(seed)  # the same VAE sample, noise and timesteps as step 0
        with torch.autocast(device.type, dtype=torch.float16, enabled=mixed_precision):
            loss = inversion_loss(parts, pixels, input_ids, dev_gen)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():  # weight decay and Adam touch every row: put all but the new one back
            embeddings[keep] = original[keep]
        losses.append(float(loss.detach()))
    embeddings.requires_grad_(False)
    learned = embeddings[token_id].detach().float().cpu().clone()
    return InversionResult(token=token, embedding=learned, losses=losses)


def save_learned_embeds(out_dir: Path, token: str, embedding: "torch.Tensor") -> list[Path]:
    """Write {token: float32 tensor[D]} as learned_embeds.safetensors and learned_embeds.bin; return both paths."""
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {token: embedding.detach().to(torch.float32).cpu().contiguous().clone()}
    paths = [out_dir / "learned_embeds.safetensors", out_dir / "learned_embeds.bin"]
    save_with(paths[0], lambda tmp: save_file(state, tmp))  # temp file + rename: never half-written
    save_with(paths[1], lambda tmp: torch.save(state, tmp))
    return paths


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
    """An image file as (3, H, W) float in [0, 1]; RGBA is composited on white (the photo is what upstream used)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(path))  # phone photos: apply the EXIF rotation
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
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
    outputs = [args.out / "learned_embeds.safetensors", args.out / "learned_embeds.bin", args.out / "invert.json"]
    check_out_folder(args.out, [o.name for o in outputs], args.overwrite)  # before training, not after
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fp16 = args.precision == "fp16" or (args.precision == "auto" and device.startswith("cuda"))
    if fp16 and not device.startswith("cuda"):
        raise ToolError(f"--precision fp16 needs a CUDA device, got --device {device}: use --precision fp32")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    parts = load_sd_parts(args.model, device, fp16)
    result = train_token(
        parts, load_image(args.image), args.token, args.init, args.steps, args.batch_size, args.lr,
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


def _resized_crop_box(shape, generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with scale (0.85, 1.15), ratio (3/4, 4/3), drawn from ``generator``."""
    import torch

    height, width = int(shape[0]), int(shape[1])
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * (0.85 + 0.30 * torch.rand((), generator=generator).item())
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=generator).item())
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    side = min(height, width)  # fallback: the central crop (the whole image for a square)
    return (height - side) // 2, (width - side) // 2, side, side


def _randn(shape, generator, like):
    import torch

    if generator is not None and generator.device != like.device:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)


def _no_grad():
    import torch

    return torch.no_grad()
