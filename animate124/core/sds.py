"""Score distillation sampling (SDS): the math shared by the video and the ControlNet-Tile guidance.

Symbols (DDPM, Ho et al. 2020; SDS, Poole et al. 2022 "DreamFusion", eq. 3):

- ``z``: clean latents of the rendered images (they carry the gradient back to the renderer);
- ``t``: integer diffusion timestep in ``[0, num_train_timesteps)``; ``ᾱ_t``: ``alphas_cumprod[t]``;
- ``z_t = √ᾱ_t · z + √(1 − ᾱ_t) · ε`` with ``ε ~ N(0, I)``;
- ``ε̂``: the guided noise prediction of the frozen diffusion model;
- ``g = w(t) · (ε̂ − ε)``: the SDS gradient with respect to ``z``;
- loss ``½‖z − sg(z − g)‖² / B`` (``sg`` = stop-gradient), whose gradient with respect to ``z`` is exactly ``g / B``.
  Its *value* is ``½‖g‖² / B`` and means nothing by itself; only its gradient matters.

Classifier-free guidance (CFG) here is always the standard form ``ε̂ = ε_u + s · (ε_c − ε_u)``. Upstream Animate124
(``main`` SD / video / ControlNet, and the ``threestudio`` branch's video guidance) writes ``ε_c + s · (ε_c − ε_u)``,
which is the standard form with scale ``s + 1``: upstream's ``100`` is our ``101``, its ``7.5`` is our ``8.5``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from animate124.core import text_encoding

Weighting = Literal["sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform"]
WEIGHTINGS: tuple[str, ...] = ("sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform")
"""Allowed ``weighting`` names, see ``sds_weight``."""


def timestep_range(
    global_step: int,
    num_train_timesteps: int = 1000,
    min_step_percent: float = 0.02,
    max_step_percent: float = 0.98,
    max_step_percent_annealed: float | None = None,
    anneal_start_step: int | None = None,
    anneal_end_step: int | None = None,
) -> tuple[int, int]:
    """The inclusive timestep range ``[min_step, max_step]`` to sample from at ``global_step``.

    ``min_step = int(N · min_step_percent)``, ``max_step = int(N · max_step_percent)`` (``N = num_train_timesteps``),
    as upstream (0.02 / 0.98 give 20 / 980). Annealing lowers ``max_step`` towards ``int(N · max_step_percent_annealed)``:

    - ``anneal_start_step`` set, ``anneal_end_step`` None: a hard switch once ``global_step > anneal_start_step``
      (upstream's ProlificDreamer-style schedule);
    - both set: linear interpolation of the percentage from ``anneal_start_step`` to ``anneal_end_step``.

    ``max_step`` never falls below ``min_step``.
    """
    _check_percent("min_step_percent", min_step_percent)
    _check_percent("max_step_percent", max_step_percent)
    if min_step_percent > max_step_percent:
        raise ValueError(
            f"timestep_range: min_step_percent={min_step_percent} > max_step_percent={max_step_percent}; swap them"
        )
    max_percent = max_step_percent
    if anneal_start_step is not None and max_step_percent_annealed is not None:
        _check_percent("max_step_percent_annealed", max_step_percent_annealed)
        if anneal_end_step is None:
            if global_step > anneal_start_step:
                max_percent = max_step_percent_annealed
        else:
            if anneal_end_step <= anneal_start_step:
                raise ValueError(
                    f"timestep_range: anneal_end_step={anneal_end_step} must be > anneal_start_step="
                    f"{anneal_start_step}; or set anneal_end_step=None for a hard switch"
                )
            frac = min(max((global_step - anneal_start_step) / (anneal_end_step - anneal_start_step), 0.0), 1.0)
            max_percent = max_step_percent + frac * (max_step_percent_annealed - max_step_percent)
    min_step = int(num_train_timesteps * min_step_percent)
    max_step = max(int(num_train_timesteps * max_percent), min_step)
    return min_step, max_step


def sample_timesteps(
    batch: int,
    min_step: int,
    max_step: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Int[Tensor, "B"]:
    """``batch`` integer timesteps drawn uniformly from ``{min_step, …, max_step}`` (both inclusive, as upstream)."""
    if not 0 <= min_step <= max_step:
        raise ValueError(
            f"sample_timesteps: need 0 <= min_step <= max_step, got min_step={min_step}, max_step={max_step}"
        )
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.randint(min_step, max_step + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device if device is not None else gen_device)


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device and moved to ``device``, so a CPU generator gives the
    same numbers whichever device the models run on."""
    gen_device = generator.device if generator is not None else (device or "cpu")
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device or gen_device)


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """A CPU generator for CPU-only draws (``randperm`` of frame indices): the generator itself, or one seeded
    deterministically from a CUDA generator's next draw."""
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def add_noise(
    latents: Float[Tensor, "B ..."],
    noise: Float[Tensor, "B ..."],
    alphas_cumprod: Float[Tensor, "N"],
    t: Int[Tensor, "B"],
) -> Float[Tensor, "B ..."]:
    """Forward diffusion ``z_t = √ᾱ_t z + √(1 − ᾱ_t) ε`` (DDPM eq. 4), one ``t`` per leading index."""
    a = _per_sample(alphas_cumprod.to(latents.device, torch.float32)[t], latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def cfg_combine(
    eps_uncond: Float[Tensor, "B ..."], eps_cond: Float[Tensor, "B ..."], guidance_scale: float
) -> Float[Tensor, "B ..."]:
    """Standard classifier-free guidance ``ε̂ = ε_u + s · (ε_c − ε_u)``.

    Upstream's ``ε_c + s · (ε_c − ε_u)`` equals this with ``s + 1``; pass ``upstream_scale + 1`` to reproduce it.
    """
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sds_weight(alphas_cumprod: Float[Tensor, "N"], t: Int[Tensor, "B"], weighting: Weighting) -> Float[Tensor, "B"]:
    """Per-sample weight ``w(t)`` of the SDS gradient.

    - ``"sds"``: ``1 − ᾱ_t`` (DreamFusion; upstream video and ControlNet guidance);
    - ``"sqrt"``: ``√(1 − ᾱ_t)`` = σ_t, the noise standard deviation;
    - ``"one-minus-sqrt-alpha"``: ``1 − √ᾱ_t`` (threestudio's unified guidances call this ``dreamfusion``;
      the static stage's SD and Zero123 terms use it);
    - ``"x0"``: ``√((1 − ᾱ_t) / ᾱ_t)``, the gradient implied by upstream ``main``'s ControlNet loss
      ``½‖z − sg(x̂₀)‖²`` with ``x̂₀ = (z_t − √(1−ᾱ) ε̂)/√ᾱ`` (≈ 0.57 at t = 200, 5.1 at t = 800);
    - ``"uniform"``: 1.
    """
    a = alphas_cumprod.to(t.device, torch.float32)[t]
    if weighting == "sds":
        return 1 - a
    if weighting == "sqrt":
        return (1 - a).sqrt()
    if weighting == "one-minus-sqrt-alpha":
        return 1 - a.sqrt()
    if weighting == "x0":
        return ((1 - a) / a).sqrt()
    if weighting == "uniform":
        return torch.ones_like(a)
    raise ValueError(f"sds_weight: weighting={weighting!r} is not one of {list(WEIGHTINGS)}")


def sds_gradient(
    eps_pred: Float[Tensor, "B ..."], noise: Float[Tensor, "B ..."], weight: Float[Tensor, "B"]
) -> Float[Tensor, "B ..."]:
    """``g = w(t) · (ε̂ − ε)`` in fp32 with NaN / ±inf replaced by 0 / ±max-float (an fp16 U-Net can overflow)."""
    grad = _per_sample(weight.float(), eps_pred) * (eps_pred.float() - noise.float())
    return torch.nan_to_num(grad)


def sds_loss(latents: Float[Tensor, "B ..."], grad: Float[Tensor, "B ..."], batch_size: int | None = None) -> Tensor:
    """Reparameterised SDS loss ``½ Σ (z − sg(z − g))² / B`` (a sum over all latent entries, divided by ``B``).

    ``∂loss/∂z = g / B`` exactly, so automatic mixed precision and optimisers see SDS like any other loss.
    ``grad`` receives no gradient. ``B`` defaults to ``latents.shape[0]`` (clips for video, frames for images).
    """
    b = latents.shape[0] if batch_size is None else batch_size
    z = latents.float()
    target = (z - grad.float()).detach()
    return 0.5 * F.mse_loss(z, target, reduction="sum") / b


NoisePredictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(z_t, t) -> (ε_c, ε_u)``: the frozen model's noise predictions for the conditional and unconditional text."""


@dataclass
class SDSStep:
    """What one ``sds_step`` computed. ``loss`` carries the gradient ``g / B`` to the latents; the rest is detached."""

    loss: Tensor
    """``½‖z − sg(z − g)‖² / B``, a scalar."""
    grad_norm: Tensor
    """``‖g‖`` over the whole batch."""
    timestep: Int[Tensor, "B"]
    noise: Tensor
    """``ε``, like the latents."""
    eps_pred: Tensor
    """``ε̂`` after classifier-free guidance."""
    weight: Float[Tensor, "B"]
    """``w(t)``."""
    grad: Tensor
    """``g = w(t) · (ε̂ − ε)``."""


def sds_step(
    latents: Float[Tensor, "B ..."],
    predict_noise: NoisePredictor,
    alphas_cumprod: Float[Tensor, "N"],
    *,
    guidance_scale: float,
    weighting: Weighting,
    min_step: int,
    max_step: int,
    generator: torch.Generator | None = None,
) -> SDSStep:
    """The SDS step shared by every guidance: one ``t ~ U{min_step, …, max_step}`` per sample, then ``ε ~ N(0, I)``
    (both from ``generator``, in that order), ``z_t``, the frozen model's ``(ε_c, ε_u)`` without gradient, standard
    CFG, ``w(t)``, ``g`` and the reparameterised loss (see the module docstring).

    Args:
        latents: ``[B, ...]`` clean latents carrying the gradient (fp32).
        predict_noise: ``(z_t, t) -> (ε_c, ε_u)``, each like ``z_t`` (see ``NoisePredictor``).
    """
    b = latents.shape[0]
    t = sample_timesteps(b, min_step, max_step, generator=generator, device=latents.device)
    noise = randn(latents.shape, generator=generator, device=latents.device)
    noisy = add_noise(latents.detach().float(), noise, alphas_cumprod, t)
    with torch.no_grad():
        eps_cond, eps_uncond = predict_noise(noisy, t)
    eps_pred = cfg_combine(eps_uncond.float(), eps_cond.float(), guidance_scale)
    weight = sds_weight(alphas_cumprod, t, weighting)
    grad = sds_gradient(eps_pred, noise, weight)
    return SDSStep(sds_loss(latents, grad, b), grad.norm(), t, noise, eps_pred, weight, grad)


def encode_latents(
    vae,
    images: Float[Tensor, "N 3 H W"],
    *,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
    graded: Tensor | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = False,
) -> Float[Tensor, "N 4 h w"]:
    """Latents ``× vae.config.scaling_factor`` (fp32) of images in [0, 1]: the posterior sampled with ``generator``
    (``mean + std · ε'``, upstream) or its mean. ``graded`` / ``chunk_size`` / ``checkpoint``: see
    ``encode_moments``."""
    mean, std = encode_moments(vae, images * 2 - 1, graded, chunk_size, checkpoint)
    latents = mean
    if sample_posterior:
        latents = mean + std * randn(mean.shape, generator=generator, device=mean.device)
    return latents * vae.config.scaling_factor


def resize_to_model(
    images: Float[Tensor, "B C H W"], size: tuple[int, int], mode: str = "bilinear"
) -> Float[Tensor, "B C h w"]:
    """Centre-crop to the target aspect ratio, then resize to ``size = (h, w)`` (bilinear, ``align_corners=False``,
    no antialiasing, as upstream).

    The crop keeps the largest centred window with aspect ``w / h`` (nothing is padded or stretched): a 144×80
    render becomes 80×80 before a square model, a 256×256 one 144×256 before a 320×576 model. Gradients flow.
    """
    h, w = images.shape[-2:]
    th, tw = size
    if h * tw > w * th:  # too tall: crop rows
        ch, cw = max(round(w * th / tw), 1), w
    else:  # too wide (or exact): crop columns
        ch, cw = h, max(round(h * tw / th), 1)
    top, left = (h - ch) // 2, (w - cw) // 2
    images = images[..., top : top + ch, left : left + cw]
    if (ch, cw) == (th, tw):
        return images
    return F.interpolate(images, size=(th, tw), mode=mode, align_corners=False)


def encode_moments(
    vae,
    images: Float[Tensor, "N 3 H W"],
    graded: Tensor | None = None,
    chunk_size: int | None = None,
    checkpoint: bool = False,
) -> tuple[Float[Tensor, "N 4 h w"], Float[Tensor, "N 4 h w"]]:
    """Posterior mean and standard deviation (fp32, *unscaled*) of images in [-1, 1], in the VAE's dtype.

    ``graded`` (``[N]`` bool, default all True): rows encoded with gradient; the others run under ``no_grad`` and get
    no gradient. ``chunk_size``: at most this many images per encoder call. ``checkpoint``: keep no encoder
    activations for the backward, which runs each graded chunk's encoder again (one more encoder forward, in
    exchange for holding one chunk's activations at a time instead of every graded image's; pair it with a
    ``chunk_size``). An encoder without a posterior (``AutoencoderTiny``: ``encode(x).latents``) gives its latents as
    the mean and a zero std.
    """
    n = images.shape[0]
    if (graded is None or bool(graded.all())) and (chunk_size is None or chunk_size >= n):
        return _graded_moments(vae, images, checkpoint)  # common case: one call, no bookkeeping
    graded = torch.ones(n, dtype=torch.bool) if graded is None else graded.cpu()
    chunk = chunk_size or n
    means, stds = [None] * n, [None] * n
    for want_grad in (True, False):
        rows = torch.nonzero(graded == want_grad).flatten().tolist()
        for start in range(0, len(rows), chunk):
            idx = rows[start : start + chunk]
            with torch.set_grad_enabled(want_grad and torch.is_grad_enabled()):
                mean, std = _graded_moments(vae, images[idx], checkpoint)
            for j, i in enumerate(idx):
                means[i], stds[i] = mean[j], std[j]
    return torch.stack(means), torch.stack(stds)


def load_pretrained_component(
    cls,
    name_or_path: str,
    subfolder: str | None = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    prefer_fp16_variant: bool = False,
    local_files_only: bool | None = None,
):
    """``cls.from_pretrained(name_or_path, subfolder=...)``, trying ``variant="fp16"`` first when asked (smaller
    download) and falling back to the default weights when the repo or folder has no fp16 files. (diffusers reads
    ``.bin`` checkpoints with ``torch.load(weights_only=True)``; safetensors are preferred when both exist.)

    Raises:
        OSError: one line naming the id and how to use a local folder when neither the hub nor a folder has it.
    """
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    folder = Path(name_or_path) / (subfolder or "")
    if folder.is_dir() and not any(folder.glob("*.fp16.*")):
        prefer_fp16_variant = False  # a local folder without fp16 files: skip the failing (and noisy) first try
    attempts = [{"variant": "fp16"}, {}] if prefer_fp16_variant else [{}]
    errors = []
    for extra in attempts:
        try:
            return cls.from_pretrained(name_or_path, torch_dtype=torch_dtype, **kwargs, **extra)
        except (OSError, ValueError, EnvironmentError) as err:  # a missing variant raises one of these
            errors.append(err)
    where = f"{name_or_path}/{subfolder}" if subfolder else name_or_path
    raise OSError(
        f"could not load {cls.__name__} from {where!r} (offline or not downloaded?): download it once with "
        f"`huggingface-cli download {name_or_path}` or set the id to a local folder in the same layout "
        f"(`animate124 make-tiny-models DIR` writes tiny test ones); last error: {str(errors[-1]).splitlines()[0]}"
    )


@dataclass
class DiffusionParts:
    """The frozen parts every SDS prior loads from a diffusers folder (see ``load_diffusion_parts``)."""

    unet: object
    vae: object
    alphas_cumprod: Float[Tensor, "N"]
    prompt_encoder: text_encoding.PromptEncoder | None
    dtype: torch.dtype
    device: torch.device


def load_diffusion_parts(
    name_or_path: str | Path,
    unet_class,
    *,
    device: torch.device | str = "cpu",
    torch_dtype: torch.dtype | None = None,
    load_text_encoder: bool = True,
    local_files_only: bool | None = None,
) -> DiffusionParts:
    """``unet`` (of ``unet_class``), ``vae``, the DDIM ``scheduler``'s ``ᾱ`` and (optionally) the cached CLIP text
    encoder from the sub-folders of a hub id or local folder, frozen. ``torch_dtype`` defaults to fp16 on CUDA (the
    ``fp16`` weight variant when present) and fp32 on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler

    device = torch.device(device)
    dtype = torch_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    path = str(name_or_path)
    kw = dict(torch_dtype=dtype, prefer_fp16_variant=dtype == torch.float16, local_files_only=local_files_only)
    unet = load_pretrained_component(unet_class, path, "unet", **kw).to(device)
    vae = load_pretrained_component(AutoencoderKL, path, "vae", **kw).to(device)
    scheduler = load_pretrained_component(DDIMScheduler, path, "scheduler", local_files_only=local_files_only)
    prompt_encoder = None
    if load_text_encoder:
        prompt_encoder = text_encoding.PromptEncoder.from_pretrained(
            path, dtype=dtype, device=device, local_files_only=local_files_only
        )
    return DiffusionParts(unet, vae, scheduler.alphas_cumprod.float(), prompt_encoder, dtype, device)


class FrozenPrior:
    """What the video and ControlNet SDS priors share: a frozen ``unet``, ``alphas_cumprod`` and an optional cached
    text encoder (``prompt_encoder``). Not an ``nn.Module`` on purpose: frozen weights stay out of trainable
    parameters and checkpoints."""

    unet: object
    alphas_cumprod: Tensor
    prompt_encoder: text_encoding.PromptEncoder | None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompt(self, prompts: str | list[str]) -> Float[Tensor, "B 77 D"]:
        """Cached CLIP embeddings ``[len(prompts), 77, D]`` (see ``text_encoding.PromptEncoder``)."""
        return text_encoding.encode_cached(self.prompt_encoder, prompts, type(self).__name__)


def freeze(*modules) -> None:
    """Eval mode and no gradients for the frozen prior's modules (anything that is not an ``nn.Module`` is skipped)."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape ``[B]`` to ``[B, 1, …, 1]`` to broadcast against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.device)


def _graded_moments(vae, images: Tensor, checkpoint: bool) -> tuple[Tensor, Tensor]:
    if checkpoint and torch.is_grad_enabled() and images.requires_grad:
        # the encoder has no randomness: the recomputation in the backward repeats the forward exactly
        return torch.utils.checkpoint.checkpoint(_moments, vae, images, use_reentrant=False)
    return _moments(vae, images)


def own_precision(network, device: torch.device):
    """Context in which a half-precision network runs in its own dtype: autocast off, as threestudio's guidances run
    their U-Nets and VAEs (``@torch.cuda.amp.autocast(enabled=False)``) and diffusers' pipelines run them. Under
    16-mixed autocast GroupNorm (and the SiLU after it) would compute and keep fp32 activations: twice the memory a
    VAE encode holds for its backward (about half the low-VRAM refine peak's activations) and more time in every
    U-Net, for no accuracy the fp16 weights could use (GroupNorm accumulates its statistics in fp32 either way).
    An fp32 network (CPU, tests) runs as it is."""
    return torch.autocast(device.type, enabled=False) if _is_half(network) else nullcontext()


def _is_half(network) -> bool:
    return network.dtype in (torch.float16, torch.bfloat16)


MATH_ATTENTION_MAX_TOKENS = 128 * 128
"""Largest attention (tokens = latent pixels of one image: a 1024 px image) ``half_math_attention`` puts on the math
kernel, whose score matrix grows with tokens^2 (0.5 GiB in fp16 at this size); larger ones keep the default kernel."""


@contextmanager
def half_math_attention(network, device: torch.device, tokens: int | None = None):
    """Context in which a half-precision network on CUDA computes scaled-dot-product attention with the math kernel,
    reducing in its own precision. For the VAE encoder: its mid-block attention is one head of 512 channels over
    (side / 8)^2 tokens, which no flash kernel takes, and the memory-efficient kernel's backward is slow at that
    width. Measured on an H200 (benchmarks/vae_encode.py, a 1024 px encode + backward, checkpointed, random weights):
    176 -> 119 ms and 6.0 -> 7.8 GiB; 512 px 36 -> 30-33 ms (two calls); the error against fp32 unchanged. Global
    flags (what ``sdpa_kernel`` sets), restored on exit; inside ``_moments``, so a checkpoint's recomputation gets
    them too. A no-op on the CPU, for fp32 networks, above ``MATH_ATTENTION_MAX_TOKENS`` ``tokens`` and on torch
    without ``allow_fp16_bf16_reduction_math_sdp`` (< 2.5)."""
    backends = torch.backends.cuda
    if (device.type != "cuda" or not _is_half(network)
            or (tokens is not None and tokens > MATH_ATTENTION_MAX_TOKENS)
            or not hasattr(backends, "allow_fp16_bf16_reduction_math_sdp")):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = backends.fp16_bf16_reduction_math_sdp_allowed()
    backends.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        backends.allow_fp16_bf16_reduction_math_sdp(before)


def _moments(vae, images: Tensor) -> tuple[Tensor, Tensor]:
    tokens = (images.shape[-2] // 8) * (images.shape[-1] // 8)  # the encoder's mid-block attention, per image
    with own_precision(vae, images.device), half_math_attention(vae, images.device, tokens):
        encoded = vae.encode(images.to(vae.dtype))
    dist = getattr(encoded, "latent_dist", None)
    if dist is None:  # deterministic encoder (AutoencoderTiny)
        mean = encoded.latents.float()
        return mean, torch.zeros_like(mean)
    return dist.mean.float(), dist.std.float()


def _check_percent(name: str, value: float):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"timestep_range: {name}={value} must be in [0, 1] (a fraction of the training timesteps)")
