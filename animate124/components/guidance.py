"""Guidances: text-to-video SDS and ControlNet-Tile SDS, with the host's call signature.

``guidance(rgb, prompt_utils, elevation, azimuth, camera_distances, **batch)``, so the system treats ours and the
host's alike. The frozen diffusion models live in the core objects (not ``nn.Module`` attributes of the system), so
they never enter a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

import threestudio
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C

from animate124.core import sds
from animate124.core.video_sds import MODELSCOPE_ID, VideoSDS


@threestudio.register("a124-video-sds-guidance")
class VideoSDSGuidance(BaseObject):
    @dataclass
    class Config(BaseObject.Config):
        pretrained_model_name_or_path: str = MODELSCOPE_ID
        """Hub id or local folder in the text-to-video layout (ModelScope default; cerspense/zeroscope_v2_576w)."""
        half_precision_weights: bool = True
        model_size: Optional[list] = None
        """[H, W] the frames are resized to; default from the model (256x256 ModelScope, 320x576 ZeroScope)."""
        guidance_scale: float = 101.0
        """Standard CFG scale. Upstream writes eps_c + s (eps_c - eps_u) with s = 100, which is standard 101."""
        weighting_strategy: Literal["sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform"] = "sds"
        """w(t): sds = 1 - alpha_bar (upstream video); see animate124.core.sds.sds_weight for the others."""
        min_step_percent: Any = 0.02
        """A number or a host C() schedule ([start_step, start, end, end_step])."""
        max_step_percent: Any = 0.98
        max_step_percent_annealed: Optional[float] = None
        anneal_start_step: Optional[int] = None
        anneal_end_step: Optional[int] = None
        low_ram_vae: int = 0
        """Encode only this many random frames with gradient (0 = all)."""
        vae_chunk_size: Optional[int] = None
        view_dependent_prompting: bool = False
        seed: Optional[int] = None

    cfg: Config

    def configure(self) -> None:
        dtype = torch.float16 if (self.cfg.half_precision_weights and self.device.type == "cuda") else torch.float32
        self.model = VideoSDS.from_pretrained(
            self.cfg.pretrained_model_name_or_path, device=self.device, torch_dtype=dtype,
            model_size=tuple(self.cfg.model_size) if self.cfg.model_size else None, load_text_encoder=False,
        )
        self.generator = None if self.cfg.seed is None else torch.Generator().manual_seed(self.cfg.seed)
        self.update_step(0, 0)

    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, rgb_as_latents: bool = False, **kwargs):
        if rgb_as_latents:
            raise ValueError("a124-video-sds-guidance renders RGB frames: call it with rgb_as_latents=False")
        text = prompt_utils.get_text_embeddings(elevation[:1], azimuth[:1], camera_distances[:1],
                                                self.cfg.view_dependent_prompting)
        cond, uncond = text.chunk(2)  # host order: cond first
        return self.model(
            rgb, cond_embeddings=cond, uncond_embeddings=uncond, guidance_scale=self.cfg.guidance_scale,
            weighting=self.cfg.weighting_strategy, min_step=self.min_step, max_step=self.max_step,
            low_ram_vae=self.cfg.low_ram_vae, vae_chunk_size=self.cfg.vae_chunk_size, generator=self.generator,
        )

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.min_step, self.max_step = sds.timestep_range(
            global_step, self.model.num_train_timesteps, C(self.cfg.min_step_percent, epoch, global_step),
            C(self.cfg.max_step_percent, epoch, global_step), self.cfg.max_step_percent_annealed,
            self.cfg.anneal_start_step, self.cfg.anneal_end_step,
        )
