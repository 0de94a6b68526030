"""Oracle guidances (tests and benchmarks only): SDS with an exact denoiser for a known 4D target scene.

``a124-oracle-image-guidance`` (image slots: SD / Zero123 stand-in) and ``a124-oracle-video-guidance`` (the video slot)
render the procedural target of ``animate124.testing.synthetic_scene`` from the cameras (elevation, azimuth, distance,
fovy) and frame times *of the batch they are called with*, and return the SDS loss of ``animate124.testing.oracle``: the
real SDS step with ε̂ = (z_t − √ᾱ z*) / √(1 − ᾱ). A run that recovers the target (``benchmarks/oracle_4d.py``,
``configs/animate124-oracle.yaml``) shows the data module, renderer, slots, stages and optimiser agree on conventions;
``convention_flip`` breaks one convention in the oracle only, as a negative control. No weights, no prompt processor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import threestudio
import torch

from animate124.components.choices import check_choice
from animate124.components.sds_guidance_base import SDSGuidanceBase
from animate124.testing import oracle


class _OracleGuidance(SDSGuidanceBase):
    """The timestep schedule, weighting and seeding of the real guidances; an exact denoiser in place of the U-Net."""

    @dataclass
    class Config(SDSGuidanceBase.Config):
        scene: str = "blobs"
        """The target 4D scene (``animate124.testing.synthetic_scene.blobs_scene``)."""
        convention_flip: str = "none"
        """Negative control: azimuth_sign | frame_order | time_reversed break that convention in the oracle only."""
        guidance_scale: float = 1.0
        """CFG scale; both halves are exact, so any scale gives the exact ε̂."""
        num_train_timesteps: int = 1000
        """Length of the (Stable Diffusion scaled_linear) noise schedule."""
        latent_channels: int = 4
        latent_downsample: int = 1
        """Average-pool factor of the linear stand-in VAE (1: latents keep every pixel)."""
        model_size: Optional[list] = None
        """[H, W] the renders are resized to before encoding (null: the render size)."""
        reference_samples: int = 256
        """Quadrature samples per ray of the target's reference renderer."""

        def __post_init__(self) -> None:
            super().__post_init__()
            name = type(self).__qualname__.split(".")[0]
            check_choice(name, "scene", self.scene, ("blobs",))
            check_choice(name, "convention_flip", self.convention_flip, oracle.CONVENTION_FLIPS)

    cfg: Config
    loss_key = ""

    def configure(self) -> None:
        self.encoder = oracle.LinearLatentEncoder(self.cfg.latent_channels, self.cfg.latent_downsample).to(self.device)
        self.alphas_cumprod = oracle.scaled_linear_alphas_cumprod(self.cfg.num_train_timesteps).to(self.device)
        self._start(self.cfg.num_train_timesteps)

    def _oracle_loss(self, rgb, elevation, azimuth, camera_distances, fovy, frame_times, rgb_as_latents: bool):
        """(loss, psnr of rgb against the target, timesteps) for images ``rgb`` [B, H, W, 3]; a clip (one timestep
        for all frames, latents [1, C, T, h, w] as the video guidance) when ``self.loss_key`` is the video one."""
        if rgb_as_latents:
            raise ValueError(f"{type(self).__name__} takes rendered RGB: call it with rgb_as_latents=False")
        missing = [k for k, v in dict(elevation=elevation, azimuth=azimuth, camera_distances=camera_distances,
                                      fovy=fovy).items() if v is None]
        if missing:
            raise ValueError(f"{type(self).__name__}: the batch has no {missing}; the oracle renders its target from "
                             "the batch cameras (a124-image-video-datamodule batches carry them)")
        b, h, w = rgb.shape[:3]
        times = torch.zeros(b, device=rgb.device) if frame_times is None else frame_times
        target = oracle.render_target(
            elevation, azimuth, camera_distances, fovy, times.reshape(-1).to(rgb.device), h, w,
            convention_flip=self.cfg.convention_flip, n_samples=self.cfg.reference_samples,
        ).to(rgb.device)
        size = tuple(self.cfg.model_size) if self.cfg.model_size else None
        latents = oracle.encode_images(self.encoder, rgb, size)
        with torch.no_grad():
            target_latents = oracle.encode_images(self.encoder, target, size)
        if self.loss_key == "loss_sds_video":  # [T, C, h, w] -> one clip [1, C, T, h, w]
            latents, target_latents = (z.permute(1, 0, 2, 3)[None] for z in (latents, target_latents))
        out = oracle.oracle_sds(
            latents, target_latents, self.alphas_cumprod, min_step=self.min_step, max_step=self.max_step,
            weighting=self.cfg.weighting_strategy, guidance_scale=self.cfg.guidance_scale, generator=self.generator,
        )
        mse = (rgb.detach().float().clamp(0, 1) - target).square().mean()
        return {
            self.loss_key: out["loss"],
            "grad_norm": out["grad"].norm(),
            "timestep": out["timestep"],
            "min_step": self.min_step,
            "max_step": self.max_step,
            "psnr": -10.0 * torch.log10(mse.clamp_min(1e-10)),
        }

    def __call__(self, rgb, prompt_utils=None, elevation=None, azimuth=None, camera_distances=None, fovy=None,
                 frame_times=None, rgb_as_latents: bool = False, **kwargs):
        """``rgb`` in [0, 1], channels last; ``prompt_utils`` is ignored (an oracle slot needs no prompt processor).
        Returns the loss, ``grad_norm``, ``timestep``, ``min_step``, ``max_step`` and ``psnr`` (dB, render against
        the target at the same cameras and times, as the oracle sees it)."""
        return self._oracle_loss(rgb, elevation, azimuth, camera_distances, fovy, frame_times, rgb_as_latents)


@threestudio.register("a124-oracle-image-guidance")
class OracleImageGuidance(_OracleGuidance):
    """For image slots (random views, one timestep per image): returns ``loss_sds``."""

    loss_key = "loss_sds"


@threestudio.register("a124-oracle-video-guidance")
class OracleVideoGuidance(_OracleGuidance):
    """For the video slot (a clip ``[T, H, W, 3]``, one timestep per clip): returns ``loss_sds_video``."""

    loss_key = "loss_sds_video"
