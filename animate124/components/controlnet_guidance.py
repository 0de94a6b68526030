"""``a124-controlnet-tile-guidance``: ControlNet-Tile SDS on a few frames of the rendered clip (Animate124 §3.3).

Host call signature (threestudio-contract §2.5) plus ``cond_rgb``: the system passes the render of the model frozen at
refine start (``controlnet_condition: frozen``) or the detached current render (``current``); ``None`` means the
latter. The U-Net text comes from ``prompt_utils`` (the textual-inversion prompt processor: "a <token> is dancing");
the ControlNet's own text (``controlnet_prompt``) is encoded here with SD's text encoder. The frozen models live in
``animate124.core.controlnet_sds.ControlNetTileSDS`` (not an ``nn.Module``), so they never enter a checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch

import threestudio
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C

from animate124.core import sds
from animate124.core.controlnet_sds import CONTROLNET_TILE_ID, SD15_ID, ControlNetTileSDS


@threestudio.register("a124-controlnet-tile-guidance")
class ControlNetTileGuidance(BaseObject):
    @dataclass
    class Config(BaseObject.Config):
        pretrained_model_name_or_path: str = SD15_ID
        """SD 1.5 hub id or local folder (unet/, vae/, scheduler/, text_encoder/, tokenizer/)."""
        controlnet_name_or_path: str = CONTROLNET_TILE_ID
        half_precision_weights: bool = True
        """fp16 weights on CUDA (always fp32 on CPU)."""
        fixed_size: int = 1024
        """Square side the frames are resized to before the VAE (latents fixed_size / 8)."""
        n_frames: int = 2
        """Frames of the clip scored per call (drawn without replacement)."""
        guidance_scale: float = 7.5
        """Standard CFG scale eps_u + s (eps_c - eps_u)."""
        controlnet_prompt: str = "best quality"
        """ControlNet text of the conditional half (the unconditional half uses the negative prompt's embedding)."""
        controlnet_conditioning_scale: float = 1.0
        weighting_strategy: Literal["sds", "sqrt", "one-minus-sqrt-alpha", "x0", "uniform"] = "sds"
        min_step_percent: Any = 0.02
        """A float or a host C-schedule [start_step, start_value, end_value, end_step]."""
        max_step_percent: Any = 0.98
        max_step_percent_annealed: Optional[float] = None
        anneal_start_step: Optional[int] = None
        anneal_end_step: Optional[int] = None
        view_dependent_prompting: bool = False
        seed: Optional[int] = None
        """Seeds the generator of frame choice, timesteps and noise (None: torch's global RNG)."""

    cfg: Config

    def configure(self) -> None:
        dtype = torch.float16 if (self.cfg.half_precision_weights and self.device.type == "cuda") else torch.float32
        self.model = ControlNetTileSDS.from_pretrained(
            self.cfg.pretrained_model_name_or_path, self.cfg.controlnet_name_or_path, device=self.device,
            torch_dtype=dtype,
        )
        # the ControlNet text is fixed: encode it once, then drop the text encoder (prompts come from prompt_utils)
        self.controlnet_embeddings = self.model.encode_prompt(self.cfg.controlnet_prompt)
        self.model.text_encoder = None
        self.generator = None if self.cfg.seed is None else torch.Generator().manual_seed(self.cfg.seed)
        self.update_step(0, 0)

    def __call__(self, rgb, prompt_utils, elevation, azimuth, camera_distances, cond_rgb=None,
                 rgb_as_latents: bool = False, **kwargs):
        """SDS on ``n_frames`` of ``rgb`` [T, H, W, 3] in [0, 1] (gets the gradient); ``cond_rgb`` [T, H, W, 3] or None
        (the detached ``rgb``). Returns ``loss_sds_cn``, ``grad_norm``, ``timestep`` [k], ``min_step``, ``max_step``."""
        if rgb_as_latents:
            raise ValueError("a124-controlnet-tile-guidance renders RGB frames: call it with rgb_as_latents=False")
        text = prompt_utils.get_text_embeddings(elevation[:1], azimuth[:1], camera_distances[:1],
                                                self.cfg.view_dependent_prompting)
        cond, uncond = text.chunk(2)  # host order: cond first
        out = self.model(
            rgb, cond_rgb=cond_rgb, cond_embeddings=cond, uncond_embeddings=uncond,
            controlnet_embeddings=self.controlnet_embeddings, num_frames=min(self.cfg.n_frames, rgb.shape[0]),
            fixed_size=self.cfg.fixed_size, guidance_scale=self.cfg.guidance_scale,
            conditioning_scale=self.cfg.controlnet_conditioning_scale, weighting=self.cfg.weighting_strategy,
            min_step=self.min_step, max_step=self.max_step, generator=self.generator,
        )
        out.update(min_step=self.min_step, max_step=self.max_step)
        return out

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        self.min_step, self.max_step = sds.timestep_range(
            global_step, self.model.alphas_cumprod.shape[0], C(self.cfg.min_step_percent, epoch, global_step),
            C(self.cfg.max_step_percent, epoch, global_step), self.cfg.max_step_percent_annealed,
            self.cfg.anneal_start_step, self.cfg.anneal_end_step,
        )
