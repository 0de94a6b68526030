"""``a124-controlnet-tile-guidance``: ControlNet-Tile SDS (SD 1.5) on k frames of the clip, conditioned on a render."""
from __future__ import annotations

from dataclasses import dataclass

import threestudio

from animate124.components.sds_guidance_base import SDSGuidanceBase
from animate124.core.guidance.controlnet_sds import CONTROLNET_TILE_ID, SD15_ID, ControlNetTileSDS


@threestudio.register("a124-controlnet-tile-guidance")
class ControlNetTileGuidance(SDSGuidanceBase):
    """ControlNet-Tile SDS on a few frames of the clip (Animate124 §3.3). ``cond_rgb`` is the render of the model
    frozen at refine start (``controlnet_condition: frozen``) or the detached current render (``None``)."""

    @dataclass
    class Config(SDSGuidanceBase.Config):
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
