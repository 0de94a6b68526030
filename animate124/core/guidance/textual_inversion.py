"""Textual inversion: a learned word embedding for the subject of the input image (Animate124, arXiv 2311.14603).

The semantic-refinement stage conditions ControlNet-Tile on a prompt such as ``"a <token> is dancing"``, where
``<token>`` stands for a new word whose embedding was optimised on the input image. This module learns that word
(``train_token``: the diffusers ``textual_inversion`` recipe; ``animate124 invert`` is its command line), writes and
reads its file, adds it to a CLIP tokenizer and text encoder and rewrites prompts to use it.

Loading is ours rather than diffusers' ``TextualInversionLoaderMixin.load_textual_inversion``, which gives the same
tokens, ids and rows for every format below (tests/unit/test_textual_inversion.py) but is a pipeline method (it
needs a pipeline-shaped object), refuses to load a token twice, names A1111 tokens by their "name" field rather than
the file name A1111 prompts use, and in diffusers 0.19.3 unpickles ``.bin`` files and checks the width only after
editing the tokenizer.

File formats read (always without unpickling code: ``torch.load(weights_only=True)`` or safetensors):

- diffusers / Animate124: ``{"<name>": tensor[D]}`` (e.g. ``{"_panda_dance_": [768]}``), ``.bin`` or ``.safetensors``;
- multi-vector: ``{"<name>": tensor[n, D]}``, added as ``name``, ``name_1``, …, ``name_{n-1}``;
- Automatic1111: ``{"string_to_param": {"*": tensor[n, D]}}`` (the token name is then the file stem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from animate124.core.io.atomic_io import save_with
from animate124.core.io.safe_files import load_tensors

PLACEHOLDER = "<token>"
"""The placeholder users write in prompts (``"a <token> is dancing"``)."""


def read_learned_embeds(path: str | Path) -> tuple[str, Float[Tensor, "n D"]]:
    """The token name and its ``[n, D]`` embedding rows from a ``learned_embeds.bin`` / ``.safetensors`` file.

    Raises:
        FileNotFoundError: the file does not exist (the message says how to make one).
        ValueError: the file holds no single embedding tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"textual inversion: no embedding file at {str(path)!r}; make one from the input image with "
            f"`animate124 invert` (see `animate124 invert --help`) or fix the path"
        )
    data = load_tensors(path)  # safetensors or a tensors-only pickle; code-running pickles are refused
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):  # Automatic1111 format
        data = {path.stem: next(iter(data["string_to_param"].values()))}
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)} if isinstance(data, dict) else {}
    if len(tensors) != 1:
        raise ValueError(
            f"textual inversion: {str(path)!r} must hold exactly one embedding tensor keyed by its token, found keys "
            f"{list(data)[:5] if isinstance(data, dict) else type(data).__name__}; re-export it with `animate124 invert`"
        )
    name, emb = next(iter(tensors.items()))
    emb = emb.detach().float()
    return name, emb.reshape(-1, emb.shape[-1])


def load_textual_inversion(
    path: str | Path, tokenizer, text_encoder, token: str | None = None, model_name: str = "text encoder"
) -> str:
    """Add the learned token(s) of ``path`` to ``tokenizer`` and write their rows into ``text_encoder``'s input
    embedding table (resized as needed). Returns the token string to put in prompts (``n`` space-separated tokens for
    a multi-vector embedding). Loading the same file twice is harmless (the rows are rewritten).

    Args:
        token: name to register instead of the file's key.
        model_name: how to name the text encoder in error messages (e.g. its hub id).

    Raises:
        ValueError: the embedding width does not match the text encoder's hidden size, or the token collides with
            an existing ordinary word of the vocabulary.
    """
    name, rows = read_learned_embeds(path)
    name = token or name
    table = text_encoder.get_input_embeddings()
    if rows.shape[-1] != table.weight.shape[-1]:
        raise ValueError(
            f"textual inversion: {str(path)!r} has {rows.shape[-1]}-d embeddings but {model_name} expects "
            f"{table.weight.shape[-1]}-d; invert against the same text encoder (SD 1.5 is 768-d) with `animate124 invert`"
        )
    tokens = embedding_tokens(name, rows.shape[0])
    for tok in tokens:
        word = ordinary_word(tokenizer, tok)
        if word is not None:
            raise ValueError(f"textual inversion: {str(path)!r} holds token {tok!r}, {shadow_text(tok, word)}")
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in tokens if t not in vocab])
    _write_rows(tokenizer, text_encoder, tokens, rows)
    return " ".join(tokens)


def embedding_tokens(name: str, n_rows: int) -> list[str]:
    """The tokens a file's ``n_rows`` vectors are added as: ``name``, ``name_1``, ..., ``name_{n-1}``."""
    return [name] + [f"{name}_{i}" for i in range(1, n_rows)]


def ordinary_word(tokenizer, token: str, allow_added: bool = True) -> str | None:
    """The vocabulary entry that ``token``, added as a new token, would take over, or None when it is new.

    CLIP keeps whole words with a word-end mark (``panda`` is the entry ``panda</w>``), so testing ``token in vocab``
    misses them: this tests the string itself, its word-end form, and what the tokenizer reads it as (one ordinary
    token, e.g. ``Panda`` is lower-cased to ``panda</w>``). A learned token that is such a word would replace every
    use of that word in the prompts. The one check ``animate124 invert``, the preflight and the prompt processor use.

    Args:
        allow_added: a token already added to this tokenizer (the same embedding loaded again) counts as new.
    """
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    if token in added:
        return None if allow_added else token
    vocab = tokenizer.get_vocab()
    for entry in (token, f"{token}</w>"):
        if entry in vocab:
            return entry
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return tokenizer.convert_ids_to_tokens(ids)[0]
    return None


def shadow_text(token: str, word: str) -> str:
    """The end of the message for a token that is already the vocabulary entry ``word``."""
    return (f"which is already the word {word!r} of the tokenizer (every {token!r} in a prompt would become the "
            f"learned vector): learn it under a new name, e.g. `animate124 invert ... --token _{token}_`")


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
    embedding: Tensor  # (D,)
    losses: list[float] = field(default_factory=list)


def check_placeholder_token(tokenizer, token: str, init_word: str) -> int:
    """The id of ``init_word``'s single token, after checking ``token`` is new.

    Raises:
        ValueError: ``init_word`` is not exactly one token, or ``token`` already is one (the message names the fix).
    """
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if len(init_ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(init_ids)
        raise ValueError(
            f"init word {init_word!r} is {len(init_ids)} tokens {pieces}, not one: use a plain single word such as "
            "'panda' (not the placeholder like '_panda_')"
        )
    word = ordinary_word(tokenizer, token, allow_added=False)
    if word is not None:
        raise ValueError(f"token {token!r} is already the word {word!r} of the vocabulary: pick a new string such as "
                         f"'_{token}_'")
    return init_ids[0]


def add_placeholder_token(tokenizer, text_encoder, token: str, init_word: str) -> int:
    """Add ``token`` to ``tokenizer`` with ``init_word``'s embedding row as its start; return its id.

    Raises:
        ValueError: see :func:`check_placeholder_token`.
    """
    init_id = check_placeholder_token(tokenizer, token, init_word)
    tokenizer.add_tokens(token)
    _write_rows(tokenizer, text_encoder, [token], text_encoder.get_input_embeddings().weight[init_id : init_id + 1])
    return tokenizer.convert_tokens_to_ids(token)


def augment_image(image: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """One random augmentation of a (3, H, W) image in [0, 1]; returns (3, size, size) in [-1, 1].

    The upstream (RealFusion) recipe, with every draw from ``generator``: resize + centre crop to 5/4 size; with
    p 0.75 rotate by U(-10, 10) degrees (white fill), centre crop 5/6 size and resize to size; RandomResizedCrop with
    area scale (0.85, 1.15) and ratio (3/4, 4/3); with p 0.75 colour jitter 0.04 (brightness, contrast, saturation,
    hue in random order); grayscale p 0.1; Gaussian blur (kernel 5, sigma U(0.1, 2)) p 0.1; horizontal flip p 0.5.
    """
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
    pixels: Tensor,
    input_ids: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Noise-prediction MSE of the frozen U-Net, conditioned on the text encoder's output for ``input_ids``.

    Args:
        parts: dict with "text_encoder", "vae", "unet", "scheduler" (diffusers / transformers objects).
        pixels: (B, 3, H, W) images in [-1, 1].
        input_ids: (B, 77) token ids.
        generator: for the VAE sample, the noise and the timesteps (on the latents' device).
    """
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
    image: Tensor,
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


def save_learned_embeds(out_dir: Path, token: str, embedding: Tensor) -> list[Path]:
    """Write {token: float32 tensor[D]} as learned_embeds.safetensors and learned_embeds.bin; return both paths."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {token: embedding.detach().to(torch.float32).cpu().contiguous().clone()}
    paths = [out_dir / "learned_embeds.safetensors", out_dir / "learned_embeds.bin"]
    save_with(paths[0], lambda tmp: save_file(state, tmp))  # temp file + rename: never half-written
    save_with(paths[1], lambda tmp: torch.save(state, tmp))
    return paths


def replace_placeholder(prompt: str, token: str, placeholder: str = PLACEHOLDER) -> str:
    """``prompt`` with every ``placeholder`` replaced by ``token`` (``"a <token> is dancing"`` →
    ``"a _panda_dance_ is dancing"``).

    Raises:
        ValueError: the prompt does not contain the placeholder (the learned subject would silently be dropped).
    """
    if placeholder not in prompt:
        raise ValueError(
            f"textual inversion: prompt {prompt!r} has no {placeholder!r} placeholder; write it where the subject goes, "
            f"e.g. 'a {placeholder} is dancing'"
        )
    return prompt.replace(placeholder, token)


def _write_rows(tokenizer, text_encoder, tokens: list[str], rows: Tensor) -> None:
    """Grow ``text_encoder``'s input embeddings to the tokenizer's size and write ``rows`` at ``tokens``' ids."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    rows = rows.detach().clone()  # rows may be a view of the table that the resize replaces
    if len(tokenizer) > text_encoder.get_input_embeddings().weight.shape[0]:
        try:  # the new rows are overwritten below, so skip transformers' mean-resizing initialisation
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        except TypeError:  # transformers < 4.46
            text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i, row in zip(ids, rows, strict=True):
            weight[i] = row.to(weight.dtype)


def _resized_crop_box(shape, generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with scale (0.85, 1.15), ratio (3/4, 4/3), drawn from ``generator``."""
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
    if generator is not None and generator.device != like.device:
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32).to(like.dtype)
