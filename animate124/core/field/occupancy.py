"""Time-aware occupancy grid for empty-space skipping in a dynamic scene.

The upstream threestudio branch keeps ONE nerfacc occupancy grid and refreshes it with the density at a single random
time per update, so space that is occupied only at other times can be pruned and fast-moving parts get clipped
(its ``nerf_volume_renderer.py``). Here the grid has T time slices (as the ``main`` branch's ``[time_size, 128^3]`` density
grid): a ray at frame time t is marched through slice ``k = min(floor(t * T), T - 1)``, and every update refreshes
EVERY slice with the max of the occupancy over ``n_times_per_update`` stratified, jittered times inside that slice's
interval [k/T, (k+1)/T). With ``n_time_slices=1`` this is the other fix: one grid updated with the max over several
times spread over [0, 1].

Semantics follow nerfacc's ``OccGridEstimator.update_every_n_steps``: every ``n`` steps; during ``warmup_steps`` all
cells are evaluated, afterwards ``cells/4`` uniformly drawn cells plus up to ``cells/4`` occupied cells per slice; each
cell is evaluated at one jittered point inside it; ``occ = density * step_size``;
``occs <- max(ema_decay * occs, occ)``; a cell is occupied when ``occs > min(mean(occs of its slice), occ_thre)``.
One deliberate difference: the grid starts all-occupied (nerfacc starts all-empty), so nothing is skipped before the
first update.

Sampling: with ``implementation="nerfacc"`` (the default on CUDA) rays are marched with nerfacc's CUDA
``traverse_grids``, one call per time slice present in the batch; with ``"torch"`` (CPU, CI) :func:`render_rays` draws
dense stratified samples and drops those for which :meth:`TimeOccupancyGrid.occupied` is False.
"""


from typing import Callable, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from animate124.core.field.work_counters import count

__all__ = ["TimeOccupancyGrid"]

Implementation = Literal["auto", "torch", "nerfacc"]
_IMPLEMENTATIONS = ("auto", "torch", "nerfacc")


class TimeOccupancyGrid(nn.Module):
    """Binary occupancy per (time slice, cell), with an EMA of the occupancy value behind it.

    Args:
        aabb: ``(xmin, ymin, zmin, xmax, ymax, zmax)`` of the grid, world units (usually the field's bbox).
        resolution: cells per axis (threestudio's ``occ_grid_res``: 32; ``main``: 128).
        n_time_slices: T (``main``: 16 in the dynamic stages). 1 = a single grid (then use
            ``n_times_per_update`` > 1 to keep every time).
        n_times_per_update: occupancy at this many stratified, jittered times per slice per update; the max is kept.
        implementation: ``"auto"`` (nerfacc marching on CUDA, torch elsewhere), ``"torch"`` or ``"nerfacc"``.

    Buffers (checkpointed): ``aabb [6]``, ``occs [T, res^3]`` (EMA occupancy), ``binaries [T, res, res, res]`` (bool,
    indexed ``[t, x, y, z]`` as nerfacc's). ``grid_coords [res^3, 3]`` is derived and not persistent.
    """

    def __init__(
        self,
        aabb: Union[Sequence[float], Float[Tensor, " 6"]],
        resolution: int = 32,
        n_time_slices: int = 16,
        n_times_per_update: int = 2,
        implementation: Implementation = "auto",
    ) -> None:
        super().__init__()
        aabb_t = torch.as_tensor(aabb, dtype=torch.float32).reshape(-1)
        if aabb_t.numel() != 6 or not bool((aabb_t[3:] > aabb_t[:3]).all()):
            raise ValueError(f"aabb must be (xmin, ymin, zmin, xmax, ymax, zmax) with max > min; got {aabb_t.tolist()}")
        for name, value in (("resolution", resolution), ("n_time_slices", n_time_slices),
                            ("n_times_per_update", n_times_per_update)):
            if int(value) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value}.")
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}; got {implementation!r}.")
        self.resolution = int(resolution)
        self.n_time_slices = int(n_time_slices)
        self.n_times_per_update = int(n_times_per_update)
        self.implementation = implementation
        cells = self.resolution**3
        self.register_buffer("aabb", aabb_t)  # [6]
        self.register_buffer("occs", torch.zeros(self.n_time_slices, cells))  # [T, res^3]
        res3 = [self.resolution] * 3
        binaries = torch.ones([self.n_time_slices, *res3], dtype=torch.bool)
        self.register_buffer("binaries", binaries)  # [T, res, res, res]
        coords = torch.stack(torch.meshgrid(*[torch.arange(self.resolution)] * 3, indexing="ij"), dim=-1)
        self.register_buffer("grid_coords", coords.reshape(cells, 3), persistent=False)  # [res^3, 3]

    @property
    def cells_per_slice(self) -> int:
        return self.resolution**3

    def uses_nerfacc(self, device: torch.device) -> bool:
        """Whether :func:`render_rays` should march with nerfacc (packed samples) on ``device``."""
        if self.implementation == "nerfacc":
            if torch.device(device).type != "cuda":
                raise ValueError(
                    f"implementation='nerfacc' marches rays with CUDA kernels but the rays are on {device}; use "
                    "implementation='torch' (or 'auto') on CPU."
                )
            return True
        return self.implementation == "auto" and torch.device(device).type == "cuda"

    def slice_index(self, times: Float[Tensor, " N"]) -> Int[Tensor, " N"]:
        """Time slice of each frame time: ``clamp(floor(t * T), 0, T - 1)``."""
        return (times * self.n_time_slices).floor().long().clamp(0, self.n_time_slices - 1)

    @torch.no_grad()
    def occupied(self, points: Float[Tensor, "N 3"], times: Float[Tensor, " N"]) -> Bool[Tensor, " N"]:
        """True where the cell holding the point is occupied in the slice of its time (False outside the aabb)."""
        lo, hi = self.aabb[:3].to(points), self.aabb[3:].to(points)
        u = (points - lo) / (hi - lo)
        inside = ((u >= 0) & (u <= 1)).all(dim=-1)
        ijk = (u * self.resolution).floor().long().clamp(0, self.resolution - 1)
        occ = self.binaries[self.slice_index(times), ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        return occ & inside

    @torch.no_grad()
    def update(
        self,
        step: int,
        density_fn: Callable[[Tensor, Tensor], Tensor],
        *,
        step_size: float,
        occ_thre: float = 0.01,
        ema_decay: float = 0.95,
        warmup_steps: int = 256,
        n: int = 16,
        generator: Optional[torch.Generator] = None,
    ) -> bool:
        """Refresh all time slices every ``n`` steps (nerfacc's ``update_every_n_steps`` semantics, see module doc).

        Args:
            step: global training step.
            density_fn: ``density_fn(points [N,3], times [N]) -> density [N] or [N,1]`` (post-activation), e.g.
                ``field.forward_density``. Called once per slice per update, without gradient.
            step_size: the renderer's marching step; occupancy value = density * step_size.
            occ_thre, ema_decay, warmup_steps, n: as nerfacc (defaults are nerfacc's / threestudio's).
            generator: for the cell, point and time jitter.

        Returns:
            True if the grid was updated at this step.
        """
        if step % n != 0:
            return False
        device = self.occs.device
        for k in range(self.n_time_slices):
            # 1. Cells to refresh: all during warm-up, else cells/4 uniform + up to cells/4 occupied.
            idx = self._cells_to_update(k, step < warmup_steps, generator)
            # 2. One jittered point per cell, M stratified jittered times inside the slice; keep the max.
            jitter = torch.rand(idx.shape[0], 3, generator=generator, device=device)
            u = (self.grid_coords[idx].float() + jitter) / self.resolution
            points = self.aabb[:3] + u * (self.aabb[3:] - self.aabb[:3])
            occ = torch.zeros(idx.shape[0], device=device)
            for j in range(self.n_times_per_update):
                r = torch.rand(idx.shape[0], generator=generator, device=device)
                times = (k + (j + r) / self.n_times_per_update) / self.n_time_slices
                density = density_fn(points, times).reshape(-1).float()
                occ = torch.maximum(occ, density * step_size)
            # 3. EMA max (scatter-amax so repeated cells are deterministic), then threshold per slice.
            row = self.occs[k]
            row[idx] = row[idx] * ema_decay
            row.scatter_reduce_(0, idx, occ, reduce="amax", include_self=True)
            thre = torch.clamp(row.mean(), max=occ_thre)
            self.binaries[k] = (row > thre).view(self.binaries.shape[1:])
        return True

    @torch.no_grad()
    def sample(
        self,
        rays_o: Float[Tensor, "R 3"],
        rays_d: Float[Tensor, "R 3"],
        times: Float[Tensor, " R"],
        *,
        t_min: Float[Tensor, " R"],
        t_max: Float[Tensor, " R"],
        step_size: float,
        stratified: bool = False,
        generator: Optional[torch.Generator] = None,
        sigma_fn: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
        alpha_thre: float = 0.0,
        early_stop_eps: float = 1e-4,
    ) -> tuple[Int[Tensor, " N"], Float[Tensor, " N"], Float[Tensor, " N"]]:
        """Packed samples by nerfacc CUDA ray marching, each ray through the occupancy slice of its own time.

        Returns ``(ray_indices, t_starts, t_ends)``, sorted by ray (nerfacc's packed layout). With ``sigma_fn`` and
        ``alpha_thre > 0``, samples with alpha below ``min(alpha_thre, mean occs)`` or behind transmittance
        ``early_stop_eps`` are dropped (as nerfacc's ``OccGridEstimator.sampling``). Not differentiable.
        """
        from nerfacc import pack_info, render_visibility_from_density
        from nerfacc.grid import traverse_grids

        near = t_min.clone()
        if stratified:
            near = near + torch.rand(near.shape, generator=generator, device=near.device, dtype=near.dtype) * step_size
        slices = self.slice_index(times)
        ray_parts, start_parts, end_parts = [], [], []
        for k in torch.unique(slices).tolist():
            sel = torch.nonzero(slices == k)[:, 0]
            intervals, samples, _ = traverse_grids(
                rays_o[sel].float(), rays_d[sel].float(), self.binaries[k : k + 1], self.aabb[None],
                near_planes=near[sel].float(), far_planes=t_max[sel].float(), step_size=step_size, cone_angle=0.0,
            )
            ray_parts.append(sel[samples.ray_indices.long()])
            start_parts.append(intervals.vals[intervals.is_left])
            end_parts.append(intervals.vals[intervals.is_right])
        ray_indices = torch.cat(ray_parts)
        order = torch.argsort(ray_indices, stable=True)
        ray_indices, t_starts, t_ends = ray_indices[order], torch.cat(start_parts)[order], torch.cat(end_parts)[order]
        count("samples_marched", ray_indices.numel())
        if sigma_fn is not None and alpha_thre > 0.0 and ray_indices.numel() > 0:
            sigmas = sigma_fn(t_starts, t_ends, ray_indices)
            keep = render_visibility_from_density(
                t_starts=t_starts, t_ends=t_ends, sigmas=sigmas, packed_info=pack_info(ray_indices, rays_o.shape[0]),
                early_stop_eps=early_stop_eps, alpha_thre=min(alpha_thre, self.occs.mean().item()),
            )
            ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]
        return ray_indices, t_starts.to(rays_o.dtype), t_ends.to(rays_o.dtype)

    # ------------------------------------------------------------------------------------------------------------------
    # helpers

    def _cells_to_update(self, k: int, warmup: bool, generator: Optional[torch.Generator]) -> Tensor:
        device = self.occs.device
        cells = self.cells_per_slice
        if warmup:
            return torch.arange(cells, device=device)
        quarter = max(cells // 4, 1)
        uniform = torch.randint(cells, (quarter,), generator=generator, device=device)
        occupied = torch.nonzero(self.binaries[k].reshape(-1))[:, 0]
        if occupied.numel() > quarter:
            pick = torch.randint(occupied.numel(), (quarter,), generator=generator, device=device)
            occupied = occupied[pick]
        return torch.cat([uniform, occupied])
