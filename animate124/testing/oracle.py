"""Oracle score distillation: SDS whose denoiser is exact for a known target, to test the training loop end to end.

A test and benchmark tool, not a prior. With a data distribution concentrated on one target latent ``z*`` (the
target scene rendered from the very cameras and times of the batch), the optimal noise predictor is

    ε̂(z_t, t) = (z_t − √ᾱ_t z*) / √(1 − ᾱ_t),

so ``ε̂ − ε = √ᾱ_t (z − z*) / √(1 − ᾱ_t)`` at every draw and the SDS gradient ``w(t)(ε̂ − ε)`` points from ``z*``
to the render's latents ``z``. Everything else is the real SDS step of ``sds.py`` (timestep draw, forward noising,
CFG combination, weighting, reparameterised loss, resize and encode), so a training loop that recovers the target
from this signal alone agrees with itself on camera axes, azimuth sign, frame order, time range, image layout and
gradient scale. ``convention_flip`` breaks one of those conventions in the oracle only (a negative control).

The "VAE" is :class:`LinearLatentEncoder`: a fixed isometric 1×1 map RGB → 4 channels (optionally average-pooled),
so latent distances are pixel distances and the target is identifiable from its latents.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from animate124.core.guidance import sds, vae_encoding
from animate124.testing.synthetic_scene import blobs_scene, orbit_camera_rays, reference_render

__all__ = [
    "CONVENTION_FLIPS",
    "LinearLatentEncoder",
    "scaled_linear_alphas_cumprod",
    "exact_noise_prediction",
    "render_target",
    "encode_images",
    "oracle_sds",
]

ConventionFlip = Literal["none", "azimuth_sign", "frame_order", "time_reversed"]
CONVENTION_FLIPS: tuple[str, ...] = ("none", "azimuth_sign", "frame_order", "time_reversed")
"""``none``; ``azimuth_sign``: the oracle renders at −azimuth; ``frame_order``: frame i of a clip gets the time of
frame T−1−i; ``time_reversed``: t → 1 − t."""


class LinearLatentEncoder(torch.nn.Module):
    """Stand-in VAE with the interface ``vae_encoding.encode_moments`` reads (``encode(x)``, ``dtype``,
    ``config.scaling_factor``): latents = avg_pool_f(Q x) with Q a fixed [C, 3] matrix with orthonormal columns. Its
    Jacobian is known by hand, so tests can follow a gradient back to the pixels exactly.

    ``downsample = 1`` is an isometry (``‖E(x) − E(y)‖ = ‖x − y‖``), so nothing of the image is lost; 8 pools like a
    real SD VAE. ``posterior=True`` answers as ``AutoencoderKL`` does (``latent_dist`` with mean = the latents and a
    log-variance of −30, a negligible std), else as a deterministic encoder (``latents``).
    """

    def __init__(self, latent_channels: int = 4, downsample: int = 1, scaling_factor: float = 0.18215, seed: int = 0,
                 posterior: bool = False):
        super().__init__()
        if latent_channels < 3 or downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"LinearLatentEncoder: need latent_channels >= 3 (injective on RGB) and downsample a power "
                             f"of 2, got {latent_channels}, {downsample}")
        q, _ = torch.linalg.qr(torch.randn(latent_channels, 3, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("weight", q)  # [C, 3], orthonormal columns
        self.downsample, self.posterior = downsample, posterior
        # a VAE with len(block_out_channels) - 1 halvings downsamples by 2 ** that
        self.config = SimpleNamespace(scaling_factor=scaling_factor,
                                      block_out_channels=(1,) * (downsample.bit_length()))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def encode(self, images: Float[Tensor, "N 3 H W"]) -> SimpleNamespace:
        latents = torch.einsum("kc,nchw->nkhw", self.weight, images)
        if self.downsample > 1:
            latents = F.avg_pool2d(latents, self.downsample)
        if not self.posterior:
            return SimpleNamespace(latents=latents)
        try:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        except ImportError:  # diffusers < 0.25
            from diffusers.models.vae import DiagonalGaussianDistribution
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([latents, torch.full_like(latents, -30.0)], 1)))


def scaled_linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Float[Tensor, "N"]:
    """ᾱ of Stable Diffusion's (and ModelScope's) ``scaled_linear`` schedule: β = linspace(√β0, √β1, N)², ᾱ = ∏(1 − β)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def exact_noise_prediction(
    noisy: Float[Tensor, "B ..."],
    target: Float[Tensor, "B ..."],
    alphas_cumprod: Float[Tensor, "N"],
    t: Int[Tensor, "B"],
) -> Float[Tensor, "B ..."]:
    """The optimal ε-prediction of a point mass at ``target``: ``(z_t − √ᾱ_t z*) / √(1 − ᾱ_t)`` (fp32)."""
    a = alphas_cumprod.to(noisy.device, torch.float32)[t].reshape(-1, *([1] * (noisy.dim() - 1)))
    return (noisy.float() - a.sqrt() * target.float()) / (1 - a).sqrt()


@torch.no_grad()
def render_target(
    elevation_deg: Float[Tensor, "B"],
    azimuth_deg: Float[Tensor, "B"],
    distance: Float[Tensor, "B"],
    fovy: Float[Tensor, "B"],
    times: Float[Tensor, "B"],
    height: int,
    width: int,
    convention_flip: ConventionFlip = "none",
    n_samples: int = 256,
    scene=blobs_scene,
) -> Float[Tensor, "B H W 3"]:
    """The target scene on white from cameras given by their angles (degrees), distances, ``fovy`` (radians) and frame
    times, through the independent camera and renderer of ``synthetic_scene``; ``convention_flip`` as
    ``CONVENTION_FLIPS``. ``B`` images (one clip's frames in order for ``frame_order``)."""
    if convention_flip not in CONVENTION_FLIPS:
        raise ValueError(f"render_target: convention_flip={convention_flip!r} is not one of {list(CONVENTION_FLIPS)}")
    if convention_flip == "azimuth_sign":
        azimuth_deg = -azimuth_deg
    elif convention_flip == "frame_order":
        times = times.flip(0)
    elif convention_flip == "time_reversed":
        times = 1.0 - times
    rays_o, rays_d = orbit_camera_rays(elevation_deg.float(), azimuth_deg.float(), distance.float(), fovy.float(),
                                       height, width)
    ray_times = times.float().reshape(-1, 1).expand(-1, height * width).reshape(-1)
    rgb, _ = reference_render(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3), ray_times, n_samples=n_samples,
                              scene=scene)
    return rgb.view(-1, height, width, 3)


def encode_images(
    encoder, images: Float[Tensor, "N H W 3"], model_size: tuple[int, int] | None = None
) -> Float[Tensor, "N C h w"]:
    """Latents (× scaling factor) of RGB images in [0, 1], channels last, as the real guidances make them: centre
    crop and resize to ``model_size`` (``None``: keep the size), map to [−1, 1], ``vae_encoding.encode_moments`` (mean)."""
    x = images.permute(0, 3, 1, 2)
    if model_size is not None:
        x = vae_encoding.resize_to_model(x, tuple(model_size))
    mean, _ = vae_encoding.encode_moments(encoder, x * 2 - 1)
    return mean * encoder.config.scaling_factor


def oracle_sds(
    latents: Float[Tensor, "B ..."],
    target_latents: Float[Tensor, "B ..."],
    alphas_cumprod: Float[Tensor, "N"],
    *,
    min_step: int,
    max_step: int,
    weighting: sds.Weighting = "sds",
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One SDS step with the exact denoiser of ``target_latents`` (no gradient to it), one timestep per leading index.

    Both CFG halves are the exact prediction (the oracle needs no text), so ``ε̂`` is exact at any ``guidance_scale``.
    Returns ``loss`` (gradient ``g / B`` on ``latents``), ``grad``, ``timestep`` ``[B]``.
    """
    # the real guidances' step (timestep and noise draws, CFG, weighting, loss); the exact denoiser of the target in
    # place of the U-Net, as both CFG halves
    target = target_latents.detach()

    def exact(noisy: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        eps = exact_noise_prediction(noisy, target, alphas_cumprod, t)
        return eps, eps

    step = sds.sds_step(latents, exact, alphas_cumprod, guidance_scale=guidance_scale, weighting=weighting,
                        min_step=min_step, max_step=max_step, generator=generator)
    return {"loss": step.loss, "grad": step.grad, "timestep": step.timestep}
