"""Images to latents through a frozen VAE encoder, in the precision and attention kernel that keep its backward small.

Images are ``[N, 3, H, W]`` in [0, 1] (``encode_latents``) or [-1, 1] (``encode_moments``); latents ``[N, 4, H/8,
W/8]`` in fp32. A half-precision VAE runs in its own dtype with autocast off (``own_precision``), and on CUDA its
mid-block attention uses the math kernel reducing in half precision (``half_math_attention``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from jaxtyping import Float
from torch import Tensor

from animate124.core.guidance.sds import randn


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


def own_precision(network, device: torch.device):
    """Context in which a half-precision network runs in its own dtype: autocast off, as threestudio's guidances run
    their U-Nets and VAEs (``@torch.cuda.amp.autocast(enabled=False)``) and diffusers' pipelines run them. Under
    16-mixed autocast GroupNorm (and the SiLU after it) would compute and keep fp32 activations: twice the memory a
    VAE encode holds for its backward (about half the low-VRAM refine peak's activations) and more time in every
    U-Net, for no accuracy the fp16 weights could use (GroupNorm accumulates its statistics in fp32 either way).
    An fp32 network (CPU, tests) runs as it is."""
    return torch.autocast(device.type, enabled=False) if _is_half(network) else nullcontext()


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


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _is_half(network) -> bool:
    return network.dtype in (torch.float16, torch.bfloat16)


def _graded_moments(vae, images: Tensor, checkpoint: bool) -> tuple[Tensor, Tensor]:
    if checkpoint and torch.is_grad_enabled() and images.requires_grad:
        # the encoder has no randomness: the recomputation in the backward repeats the forward exactly
        return torch.utils.checkpoint.checkpoint(_moments, vae, images, use_reentrant=False)
    return _moments(vae, images)


def _moments(vae, images: Tensor) -> tuple[Tensor, Tensor]:
    tokens = (images.shape[-2] // 8) * (images.shape[-1] // 8)  # the encoder's mid-block attention, per image
    with own_precision(vae, images.device), half_math_attention(vae, images.device, tokens):
        encoded = vae.encode(images.to(vae.dtype))
    dist = getattr(encoded, "latent_dist", None)
    if dist is None:  # deterministic encoder (AutoencoderTiny)
        mean = encoded.latents.float()
        return mean, torch.zeros_like(mean)
    return dist.mean.float(), dist.std.float()
