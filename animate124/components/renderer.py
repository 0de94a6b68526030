"""``a124-time-volume-renderer``: threestudio's VolumeRenderer contract around the core time-aware renderer.

Each image of a batch has its own frame time (``frame_times`` [B] in the batch, 0 when absent), so a 16-frame clip is
rendered by ONE field evaluation. Empty space is skipped with a time-sliced occupancy grid that never prunes space
occupied at another time (upstream's single grid does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import threestudio
import torch
from threestudio.models.renderers.base import VolumeRenderer
from threestudio.utils.typing import Dict, Float, Tensor

from animate124.components.choices import check_choice
from animate124.core.field.occupancy import TimeOccupancyGrid
from animate124.core.render.volrend import render_rays


@threestudio.register("a124-time-volume-renderer")
class TimeVolumeRenderer(VolumeRenderer):
    @dataclass
    class Config(VolumeRenderer.Config):
        num_samples_per_ray: int = 256
        """Samples per ray (dense CPU path) / marching step = |bbox diagonal| / this (occupancy path)."""
        eval_chunk_size: int = 160000
        """Points per field call at evaluation (0 = no chunking)."""
        randomized: bool = True
        """Jitter samples in training."""
        near_plane: float = 0.0
        far_plane: float = 1e10
        return_comp_normal: bool = False
        """Also return ``comp_normal`` in training (needed by the 2-D normal-smoothness loss)."""
        estimator: str = "occgrid"
        """``occgrid``: time-sliced occupancy grid; ``none``: dense stratified samples only."""
        occ_grid_res: int = 32
        occ_n_time_slices: int = 16
        """Time slices of the occupancy grid; a ray at time t marches slice floor(t * slices)."""
        occ_n_times_per_update: int = 2
        """Times evaluated per slice and update; the max is kept so nothing occupied at any time is pruned."""
        occ_update_every: int = 16
        occ_warmup_steps: int = 256
        occ_thre: float = 0.01
        occ_ema_decay: float = 0.95
        alpha_thre: float = 0.01
        """> 0: a density query without gradient first drops samples with alpha below this or transmittance below
        1e-4 (behind opaque surfaces), as upstream threestudio's renderer (0.01); 0: every sample in an occupied cell
        is evaluated with gradient."""
        implementation: str = "auto"
        """Occupancy marching backend: nerfacc on CUDA, torch elsewhere (``auto``)."""
        normal_frames: int = 0
        """> 0: a training render of more images than this computes normals on this many of them, drawn at random
        each step (``normal_frame_mask`` [B] in the output says which; the 2-D normal smoothness averages over those
        only, an unbiased estimate of the all-frame loss; another system's normal losses must read the mask too).
        0: on every image, as upstream."""
        normal_weight_min: float = 0.0
        """> 0: samples of weight below this get no normal (they would add at most their weight to ``sum w n``;
        ``normal_skipped_weight`` per pixel), in training and in evaluation renders (validation / test normal
        images). 0: every sample, as upstream."""

        def __post_init__(self) -> None:
            check_choice("a124-time-volume-renderer", "estimator", self.estimator, ("occgrid", "none"))
            check_choice("a124-time-volume-renderer", "implementation", self.implementation, ("auto", "torch", "nerfacc"))
            if self.normal_frames < 0 or not 0.0 <= self.normal_weight_min < 1.0:
                raise ValueError(
                    f"a124-time-volume-renderer: normal_frames must be >= 0 and normal_weight_min in [0, 1); got "
                    f"{self.normal_frames} and {self.normal_weight_min} (0 and 0.0 give every sample a normal)")

    cfg: Config

    def configure(self, geometry, material, background) -> None:
        super().configure(geometry, material, background)
        diag = float((self.bbox[1] - self.bbox[0]).norm())
        self.render_step_size = diag / self.cfg.num_samples_per_ray
        self.estimator: Optional[TimeOccupancyGrid] = None
        if self.cfg.estimator == "occgrid":
            self.estimator = TimeOccupancyGrid(
                self.bbox.reshape(-1).tolist(),
                resolution=self.cfg.occ_grid_res,
                n_time_slices=self.cfg.occ_n_time_slices,
                n_times_per_update=self.cfg.occ_n_times_per_update,
                implementation=self.cfg.implementation,
            )
        self.randomized = self.cfg.randomized

    def forward(
        self,
        rays_o: Float[Tensor, "B H W 3"],
        rays_d: Float[Tensor, "B H W 3"],
        light_positions: Float[Tensor, "B 3"],
        bg_color: Optional[Tensor] = None,
        frame_times: Optional[Float[Tensor, "B"]] = None,
        return_normal: Optional[bool] = None,
        generator: Optional[torch.Generator] = None,
        **kwargs,
    ) -> Dict[str, Tensor]:
        batch_size, height, width = rays_o.shape[:3]
        n_pix = height * width
        if frame_times is None:
            frame_times = torch.zeros(batch_size, device=rays_o.device)
        frame_times = torch.as_tensor(frame_times, dtype=torch.float32, device=rays_o.device).reshape(-1)
        if frame_times.numel() == 1 and batch_size > 1:
            frame_times = frame_times.expand(batch_size)
        if frame_times.numel() != batch_size:
            raise ValueError(
                f"frame_times has {frame_times.numel()} entries for a batch of {batch_size} images: give one time per image"
            )
        if return_normal is None:
            return_normal = self.material.requires_normal or (self.cfg.return_comp_normal or not self.training)
        rays_o_flat = rays_o.reshape(-1, 3)
        rays_d_flat = rays_d.reshape(-1, 3)
        times = frame_times.repeat_interleave(n_pix)
        lights = light_positions.reshape(-1, 1, 3).expand(-1, n_pix, -1).reshape(-1, 3)
        material_kwargs = kwargs if self.training else {}

        def color_fn(geo_out: dict, points: Tensor, dirs: Tensor, ray_indices: Tensor) -> Tensor:
            return self.material(
                viewdirs=dirs, positions=points, light_positions=lights[ray_indices], **geo_out, **material_kwargs
            )

        def field_fn(points: Tensor, t: Tensor, output_normal: bool) -> dict:
            return self.geometry(points, times=t, output_normal=output_normal or self.material.requires_normal)

        # normals only where they are used and weigh (the material shades with every sample's normal otherwise)
        frame_mask, normal_rays, weight_min, normal_fn = None, None, 0.0, None
        if return_normal and not self.material.requires_normal:
            weight_min = self.cfg.normal_weight_min
            if self.training and 0 < self.cfg.normal_frames < batch_size:
                pick = torch.randperm(batch_size, generator=generator, device=rays_o.device)[: self.cfg.normal_frames]
                frame_mask = torch.zeros(batch_size, dtype=torch.bool, device=rays_o.device).index_fill(0, pick, True)
                normal_rays = frame_mask.repeat_interleave(n_pix)
            if hasattr(self.geometry, "forward_normal"):
                normal_fn = lambda points, t, density: self.geometry.forward_normal(points, times=t, density=density)  # noqa: E731

        bg = self._background(bg_color, rays_d, batch_size, height, width)
        out = render_rays(
            field_fn,
            rays_o_flat,
            rays_d_flat,
            times,
            num_samples=self.cfg.num_samples_per_ray,
            near=self.cfg.near_plane,
            far=self.cfg.far_plane,
            aabb=self.bbox.reshape(-1),
            color_fn=color_fn,
            estimator=self.estimator,
            bg_color=bg,
            randomized=self.randomized and self.training,
            generator=generator,
            return_normal=return_normal,
            alpha_thre=self.cfg.alpha_thre,
            density_fn=lambda points, t: self.geometry.forward_density(points, times=t),
            chunk_size=0 if self.training else self.cfg.eval_chunk_size,
            normal_rays=normal_rays,
            normal_weight_min=weight_min,
            normal_fn=normal_fn,
        ).to_dict()
        result = {}
        for key in ("comp_rgb", "comp_rgb_fg", "comp_rgb_bg", "opacity", "depth", "z_variance", "comp_normal",
                    "normal_skipped_weight"):
            if key in out:
                result[key] = out[key].view(batch_size, height, width, -1)
        if frame_mask is not None:
            result["normal_frame_mask"] = frame_mask
        if self.training:
            for key in ("weights", "t_points", "t_intervals", "ray_indices", "points", "density", "normal"):
                if key in out:
                    result[key] = out[key]
        return result

    def _background(self, bg_color, rays_d, batch_size, height, width) -> Tensor:
        if bg_color is None:
            bg = self.background(dirs=rays_d)
        else:
            bg = torch.as_tensor(bg_color, dtype=rays_d.dtype, device=rays_d.device)
            if bg.shape[:-1] == (batch_size,):
                bg = bg[:, None, None, :].expand(-1, height, width, -1)
            bg = bg.expand(batch_size, height, width, bg.shape[-1])
        return bg.reshape(batch_size * height * width, -1)

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        if self.estimator is None or not self.training or on_load_weights:
            return
        # seeded by the step: every DDP rank makes the same draws on the same (synchronised) field, so the
        # occupancy grids stay identical across ranks without communication
        generator = torch.Generator(device=self.bbox.device).manual_seed(int(global_step))
        self.estimator.update(
            global_step,
            lambda points, t: self.geometry.forward_density(points, times=t),
            step_size=self.render_step_size,
            occ_thre=self.cfg.occ_thre,
            ema_decay=self.cfg.occ_ema_decay,
            warmup_steps=self.cfg.occ_warmup_steps,
            n=self.cfg.occ_update_every,
            generator=generator,
        )

    def train(self, mode: bool = True):
        self.randomized = mode and self.cfg.randomized
        return super().train(mode=mode)

    def eval(self):
        self.randomized = False
        return super().eval()

