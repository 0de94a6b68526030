"""Guidances: text-to-video SDS and ControlNet-Tile SDS, with the host's call signature.

``guidance(rgb, prompt_utils, elevation, azimuth, camera_distances, **batch)``, so the system treats ours and the
host's alike. The frozen diffusion models live in the core objects (not ``nn.Module`` attributes of the system), so
they never enter a checkpoint. Text comes from ``prompt_utils`` (host order: conditional first, then unconditional).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import threestudio
import torch
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C

from animate124.components.choices import check_choice
from animate124.core.guidance import sds
from animate124.core.guidance.controlnet_sds import CONTROLNET_TILE_ID, SD15_ID, ControlNetTileSDS
from animate124.core.guidance.video_sds import MODELSCOPE_ID, VideoSDS


class _SDSGuidance(BaseObject):
    """What both guidances share: weights dtype, timestep range (with annealing), text lookup, seeded draws."""

    @dataclass
    class Config(BaseObject.Config):
        half_precision_weights: bool = True
        """fp16 weights on CUDA (always fp32 on CPU); losses are computed in fp32."""
        weighting_strategy: str = "sds"
        """w(t): sds = 1 - alpha_bar (upstream); see animate124.core.guidance.sds.sds_weight for the others."""
        min_step_percent: Any = 0.02
        """A number or a host C() schedule ([start_step, start, end, end_step])."""
        max_step_percent: Any = 0.98
        max_step_percent_annealed: Optional[float] = None
        anneal_start_step: Optional[int] = None
        anneal_end_step: Optional[int] = None
        view_dependent_prompting: bool = False
        """Off by default: a moving-camera clip has no single view."""
        seed: Optional[int] = None
        """Seeds timesteps, noise and frame choice (None: torch's global RNG)."""

        def __post_init__(self) -> None:
            check_choice(type(self).__qualname__.split(".")[0], "weighting_strategy", self.weighting_strategy, sds.WEIGHTINGS)

    cfg: Config
    num_train_timesteps: int

    def _weights_dtype(self) -> torch.dtype:
        return torch.float16 if (self.cfg.half_precision_weights and self.device.type == "cuda") else torch.float32

    def _start(self, num_train_timesteps: int) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.generator = None if self.cfg.seed is None else torch.Generator().manual_seed(self.cfg.seed)
        self.update_step(0, 0)

    def _text(self, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents: bool):
        if rgb_as_latents:
            raise ValueError(f"{type(self).__name__} takes rendered RGB frames: call it with rgb_as_latents=False")
        text = prompt_utils.get_text_embeddings(elevation[:1], azimuth[:1], camera_distances[:1],
                                                self.cfg.view_dependent_prompting)
        return text.chunk(2)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.min_step, self.max_step = sds.timestep_range(
            global_step, self.num_train_timesteps, C(self.cfg.min_step_percent, epoch, global_step),
            C(self.cfg.max_step_percent, epoch, global_step), self.cfg.max_step_percent_annealed,
            self.cfg.anneal_start_step, self.cfg.anneal_end_step,
        )


@threestudio.register("a124-video-sds-guidance")
class VideoSDSGuidance(_SDSGuidance):
    @dataclass
    class Config(_SDSGuidance.Config):
        pretrained_model_name_or_path: str = MODELSCOPE_ID
        """Hub id or local folder in the text-to-video layout (ModelScope default; cerspense/zeroscope_v2_576w)."""
        model_size: Optional[list] = None
        """[H, W] the frames are resized to; default from the model (256x256 ModelScope, 320x576 ZeroScope)."""
        guidance_scale: float = 101.0
        """Standard CFG scale. Upstream writes eps_c + s (eps_c - eps_u) with s = 100, which is standard 101."""
        low_ram_vae: int = 0
        """Encode only this many random frames with gradient (0 = all)."""
        vae_chunk_size: Optional[int] = None
        """Encode at most this many frames per VAE call."""
        vae_checkpoint: bool = False
        """Recompute each chunk's VAE encoder in the backward instead of keeping its activations (set
        ``vae_chunk_size`` too): less memory, one more encoder forward per step."""

    cfg: Config

    def configure(self) -> None:
        self.model = VideoSDS.from_pretrained(
            self.cfg.pretrained_model_name_or_path, device=self.device, torch_dtype=self._weights_dtype(),
            model_size=tuple(self.cfg.model_size) if self.cfg.model_size else None, load_text_encoder=False,
        )
        self._start(self.model.num_train_timesteps)

    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents: bool = False, **kwargs):
        """Video SDS of the clip ``rgb`` [T, H, W, 3] in [0, 1]; returns ``loss_sds_video``, ``grad_norm``,
        ``timestep``, ``min_step``, ``max_step``."""
        cond, uncond = self._text(prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents)
        return self.model(
            rgb, cond_embeddings=cond, uncond_embeddings=uncond, guidance_scale=self.cfg.guidance_scale,
            weighting=self.cfg.weighting_strategy, min_step=self.min_step, max_step=self.max_step,
            low_ram_vae=self.cfg.low_ram_vae, vae_chunk_size=self.cfg.vae_chunk_size,
            vae_checkpoint=self.cfg.vae_checkpoint, generator=self.generator,
        )


@threestudio.register("a124-controlnet-tile-guidance")
class ControlNetTileGuidance(_SDSGuidance):
    """ControlNet-Tile SDS on a few frames of the clip (Animate124 §3.3). ``cond_rgb`` is the render of the model
    frozen at refine start (``controlnet_condition: frozen``) or the detached current render (``None``)."""

    @dataclass
    class Config(_SDSGuidance.Config):
        pretrained_model_name_or_path: str = SD15_ID
        """SD 1.5 hub id or local folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/)."""
        controlnet_name_or_path: str = CONTROLNET_TILE_ID
        fixed_size: int = 1024
        """Square side the frames are resized to before the VAE (latents fixed_size / 8)."""
        n_frames: int = 2
        """Frames of the clip scored per call (drawn without replacement)."""
        guidance_scale: float = 7.5
        """Standard CFG scale eps_u + s (eps_c - eps_u)."""
        controlnet_prompt: str = "best quality"
        """ControlNet text of the conditional half (the unconditional half uses the negative prompt's embedding)."""
        controlnet_conditioning_scale: float = 1.0
        vae_checkpoint: bool = False
        """Encode the frames one at a time, recomputing each one's VAE encoder in the backward: less memory, one
        more encoder forward per step."""

    cfg: Config

    def configure(self) -> None:
        self.model = ControlNetTileSDS.from_pretrained(
            self.cfg.pretrained_model_name_or_path, self.cfg.controlnet_name_or_path, device=self.device,
            torch_dtype=self._weights_dtype(),
        )
        # the ControlNet text is fixed: encode it once, then drop the text encoder (prompts come from prompt_utils)
        self.controlnet_embeddings = self.model.encode_prompt(self.cfg.controlnet_prompt)
        self.model.prompt_encoder = None
        self._start(self.model.alphas_cumprod.shape[0])

    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, cond_rgb=None,
                 rgb_as_latents: bool = False, **kwargs):
        """SDS on ``n_frames`` of ``rgb`` [T, H, W, 3] in [0, 1] (gets the gradient); ``cond_rgb`` [T, H, W, 3] or None
        (the detached ``rgb``). Returns ``loss_sds_cn``, ``grad_norm``, ``timestep`` [k], ``min_step``, ``max_step``."""
        cond, uncond = self._text(prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents)
        out = self.model(
            rgb, cond_rgb=cond_rgb, cond_embeddings=cond, uncond_embeddings=uncond,
            controlnet_embeddings=self.controlnet_embeddings, num_frames=min(self.cfg.n_frames, rgb.shape[0]),
            fixed_size=self.cfg.fixed_size, guidance_scale=self.cfg.guidance_scale,
            conditioning_scale=self.cfg.controlnet_conditioning_scale, weighting=self.cfg.weighting_strategy,
            min_step=self.min_step, max_step=self.max_step, vae_checkpoint=self.cfg.vae_checkpoint,
            generator=self.generator,
        )
        out.update(min_step=self.min_step, max_step=self.max_step)
        return out
