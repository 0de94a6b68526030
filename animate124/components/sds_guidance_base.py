"""What our SDS guidances share, with the host's call signature.

``guidance(rgb, prompt_utils, elevation, azimuth, camera_distances, **batch)``, so the system treats ours and the
host's alike. The frozen diffusion models live in the core objects (not ``nn.Module`` attributes of the system), so
they never enter a checkpoint. Text comes from ``prompt_utils`` (host order: conditional first, then unconditional).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from threestudio.utils.base import BaseObject
from threestudio.utils.misc import C

from animate124.components.choices import check_choice
from animate124.core.guidance import sds


class SDSGuidanceBase(BaseObject):
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
        """Append the host's view suffix ("..., side view") for the first frame's camera (the video guidance turns
        it on, as upstream; the ControlNet guidance leaves it off)."""
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
