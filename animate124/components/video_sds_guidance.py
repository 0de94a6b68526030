"""``a124-video-sds-guidance``: text-to-video SDS (ModelScope / ZeroScope U-Net3D) on the rendered clip."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import threestudio

from animate124.components.sds_guidance_base import SDSGuidanceBase
from animate124.core.guidance.video_sds import MODELSCOPE_ID, VideoSDS


@threestudio.register("a124-video-sds-guidance")
class VideoSDSGuidance(SDSGuidanceBase):
    @dataclass
    class Config(SDSGuidanceBase.Config):
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
        view_dependent_prompting: bool = True
        """The motion prompt with the host's view suffix for the clip's first camera ("a panda is dancing, side
        view"), as upstream's video guidance; false: the plain motion prompt."""

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
