"""Time-aware volume rendering: many frame times x rays in one call.

Every ray carries its own frame time ``t`` in [0, 1], so the F frames of a video batch (or any mix of times) are
rendered by ONE field evaluation; there is no mutable "current frame time" anywhere (upstream sets one and renders frame by frame).

Compositing follows the classic quadrature (Max 1995; NeRF eq. 3), computed with nerfacc::

    alpha_i = 1 - exp(-sigma_i * delta_i),   T_i = exp(-sum_{j<i} sigma_j * delta_j),   w_i = T_i * alpha_i
    comp_rgb_fg = sum_i w_i c_i,   opacity = sum_i w_i,   depth = sum_i w_i z_i   (not divided by opacity)
    comp_rgb = comp_rgb_fg + bg * (1 - opacity)

Two sample layouts:

* **dense** ``[R, S]`` (any device; the CPU/CI path): S stratified samples between each ray's near and far (clipped
  to the AABB when given). nerfacc's batched ``render_weight_from_density`` / ``accumulate_along_rays`` are plain
  torch (cumsum / sum), so this path needs no compiled code. With a torch-mode occupancy estimator, samples in empty
  cells (at the ray's own time slice) are not evaluated and get density 0.
* **packed** (CUDA, with a nerfacc-mode :class:`~animate124.core.field.occupancy.TimeOccupancyGrid`): nerfacc ray marching
  per time slice, then nerfacc's packed compositing.

Per-sample outputs (``weights``, ``points``, ``ray_indices``, ...) are always returned packed: one row per evaluated
sample, like threestudio's NeRF renderer.
"""


from dataclasses import dataclass, fields
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from animate124.core.field.work_counters import count, counting

__all__ = ["RenderOutput", "render_rays", "ray_aabb_intersect", "stratified_samples", "default_color_fn"]

FieldFn = Callable[..., dict]
ColorFn = Callable[[dict, Tensor, Tensor, Tensor], Tensor]


@dataclass
class RenderOutput:
    """Result of :func:`render_rays`. Ray tensors are ``[R, .]``; sample tensors are packed ``[N, .]``."""

    comp_rgb: Float[Tensor, "R C"]
    comp_rgb_fg: Float[Tensor, "R C"]
    comp_rgb_bg: Float[Tensor, "R C"]
    opacity: Float[Tensor, "R 1"]
    depth: Float[Tensor, "R 1"]
    z_variance: Float[Tensor, "R 1"]
    weights: Float[Tensor, "N 1"]
    ray_indices: Int[Tensor, " N"]
    t_points: Float[Tensor, "N 1"]
    t_intervals: Float[Tensor, "N 1"]
    points: Float[Tensor, "N 3"]
    density: Float[Tensor, "N 1"]
    comp_normal: Optional[Float[Tensor, "R 3"]] = None
    normal: Optional[Float[Tensor, "N 3"]] = None
    normal_skipped_weight: Optional[Float[Tensor, "R 1"]] = None
    """Per ray, the weight of the samples left without a normal by ``normal_weight_min`` (rays outside
    ``normal_rays`` count 0): the most ``sum w n`` can differ from the full sum."""

    def to_dict(self) -> dict:
        """threestudio-style string-keyed dict; ``None`` entries are left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def default_color_fn(field_out: dict, points: Tensor, dirs: Tensor, ray_indices: Optional[Tensor] = None) -> Tensor:
    """Colour of each sample: ``field_out["rgb"]`` if the field gives it, else ``sigmoid(field_out["features"])``
    (threestudio's ``no-material`` with ``color_activation: sigmoid``)."""
    if "rgb" in field_out:
        return field_out["rgb"]
    return torch.sigmoid(field_out["features"])


def render_rays(
    field_fn: FieldFn,
    rays_o: Float[Tensor, "R 3"],
    rays_d: Float[Tensor, "R 3"],
    times: Float[Tensor, " R"],
    *,
    num_samples: int,
    near: float = 0.0,
    far: float = 1e10,
    aabb: Optional[Union[Float[Tensor, " 6"], tuple]] = None,
    color_fn: Optional[ColorFn] = None,
    estimator=None,
    bg_color: Optional[Float[Tensor, "..."]] = None,
    randomized: bool = False,
    generator: Optional[torch.Generator] = None,
    return_normal: bool = False,
    alpha_thre: float = 0.0,
    chunk_size: int = 0,
    density_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    normal_rays: Optional[Bool[Tensor, " R"]] = None,
    normal_weight_min: float = 0.0,
    normal_fn: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
) -> RenderOutput:
    """Render rays, each at its own frame time, through ``field_fn``.

    Args:
        field_fn: ``field_fn(points [N,3], times [N], output_normal: bool) -> dict`` with ``"density"`` [N,1]
            (post-activation, >= 0), ``"features"`` [N,F] and/or ``"rgb"`` [N,C], and ``"normal"`` [N,3] when
            ``output_normal``. :class:`~animate124.core.field.dynamic_field.DynamicField` is such a callable.
        rays_o, rays_d: ray origins and (normalised) directions, world units. No gradient is taken through them.
        times: frame time of each ray, in [0, 1]. No gradient.
        num_samples: samples per ray in the dense layout. In the packed layout the marching step is
            ``|aabb diagonal| / num_samples`` (threestudio's ``render_step_size`` = 1.732 * 2r / num_samples).
        near, far: ray-parameter range, intersected with ``aabb`` when given (rays missing it render empty).
        aabb: ``(xmin, ymin, zmin, xmax, ymax, zmax)``; required with an estimator (taken from it when omitted).
        color_fn: ``color_fn(field_out, points [N,3], dirs [N,3], ray_indices [N]) -> [N,C]``; default
            :func:`default_color_fn`.
            Wrap a threestudio material here.
        estimator: optional :class:`~animate124.core.field.occupancy.TimeOccupancyGrid` (time-aware empty-space skipping).
        bg_color: background colour, ``[R, C]`` or broadcastable (e.g. ``[C]``); ``None`` means black.
        randomized: jitter the samples (training); deterministic bin centres otherwise.
        generator: torch.Generator for the jitter.
        return_normal: ask the field for normals and return ``comp_normal`` = ((normalize(sum w n) + 1) / 2) * opacity.
        alpha_thre: > 0: before the field is evaluated with gradient, one density query per sample without
            gradient drops the samples whose alpha is below ``alpha_thre`` (``min(alpha_thre, mean occupancy)`` with
            an estimator, as nerfacc) or whose transmittance is below 1e-4 (behind an opaque surface): nerfacc's
            ``OccGridEstimator.sampling`` with a ``sigma_fn``, upstream threestudio's 0.01. Both layouts.
        chunk_size: evaluate the field in chunks of this many points (0 = all at once; use for evaluation).
        density_fn: ``density_fn(points [N,3], times [N]) -> [N,1]`` for the ``alpha_thre`` queries; default: the
            ``"density"`` of ``field_fn``.
        normal_rays: with ``return_normal``, only the samples of these rays get normals (the others' ``comp_normal``
            is ``0.5 * opacity``, i.e. meaningless: leave them out of normal losses). ``None``: every ray.
        normal_weight_min: with ``return_normal``, only samples of weight ``w >= normal_weight_min`` get normals.
            The normals' finite differences are most of a render's field work (6 density queries per sample with
            central differences); ``sum w n`` then misses at most the skipped samples' weight per ray (unit normals),
            which is reported as ``normal_skipped_weight``. 0 with ``normal_rays`` None: every sample, as before.
        normal_fn: ``normal_fn(points [M,3], times [M], density [M,1]) -> [M,3]`` for those samples (the density is
            the field's at the same points, for forward differences); default: ``field_fn(..., True)["normal"]``,
            which evaluates the field at the points again.

    Returns:
        :class:`RenderOutput` (``.to_dict()`` for threestudio keys). ``depth`` is ``sum w z`` (not normalised);
        ``z_variance`` is HiFA's weighted variance of z, zeroed where opacity <= 0.5, as in threestudio.
    """
    # 1. Check inputs once.
    _check_inputs(rays_o, rays_d, times, num_samples)
    if aabb is None and estimator is not None:
        aabb = estimator.aabb
    if aabb is None and far >= 1e9:
        raise ValueError(f"far={far} with aabb=None leaves the sampled segment unbounded: pass aabb= or a finite far.")
    aabb_t = None if aabb is None else torch.as_tensor(aabb, dtype=rays_o.dtype, device=rays_o.device).reshape(6)
    color_fn = default_color_fn if color_fn is None else color_fn
    n_rays = rays_o.shape[0]
    t_near, t_far, hit = _near_far(rays_o, rays_d, near, far, aabb_t)
    density_fn = density_fn or _density_of(field_fn)  # the alpha_thre queries, without gradient

    # 2. Samples: packed (nerfacc marching on CUDA) or dense [R, S] (any device).
    count("rays", n_rays)
    if estimator is not None and estimator.uses_nerfacc(rays_o.device):
        step = float(torch.linalg.norm(aabb_t[3:] - aabb_t[:3])) / num_samples
        sigma_fn = None
        if alpha_thre > 0.0:
            sigma_fn = _make_sigma_fn(density_fn, rays_o, rays_d, times, chunk_size)
        ray_indices, t_starts, t_ends = estimator.sample(
            rays_o, rays_d, times, t_min=t_near, t_max=t_far, step_size=step, stratified=randomized,
            generator=generator, sigma_fn=sigma_fn, alpha_thre=alpha_thre,
        )
        t_mid = (t_starts + t_ends) / 2
        mask = None
    else:
        t_mid, t_starts, t_ends = stratified_samples(t_near, t_far, num_samples, randomized, generator)
        mask = hit[:, None].expand_as(t_mid)
        if estimator is not None:
            pts = rays_o[:, None] + rays_d[:, None] * t_mid[..., None]
            mask = mask & estimator.occupied(pts.reshape(-1, 3), times[:, None].expand_as(t_mid).reshape(-1)).view(
                t_mid.shape
            )
        if counting():  # (the packed layout counts in the estimator's marching)
            count("samples_marched", int(mask.sum()))
        if alpha_thre > 0.0 and bool(mask.any()):
            thre = alpha_thre if estimator is None else min(alpha_thre, float(estimator.occs.mean()))
            mask = mask & _visible(density_fn, rays_o, rays_d, times, t_mid, t_starts, t_ends, mask, thre, chunk_size)
        ray_indices = torch.arange(n_rays, device=rays_o.device)[:, None].expand_as(t_mid)[mask]

    # Nothing left to evaluate (all rays empty or pruned): keep one zero-weight sample so the field stays in the
    # graph (as threestudio's validate_empty_rays); `empty` zeroes its density.
    empty = ray_indices.numel() == 0
    if empty and mask is None:
        ray_indices = torch.zeros(1, dtype=torch.long, device=rays_o.device)
        t_starts = t_ends = t_mid = t_near[:1]
    elif empty:
        mask = mask.clone()
        mask[0, 0] = True
        ray_indices = ray_indices.new_zeros(1)

    # 3. Evaluate the field on the kept samples (each at its ray's time).
    count("samples", 0 if empty else ray_indices.numel())
    z = t_mid if mask is None else t_mid[mask]
    dirs = rays_d[ray_indices]
    points = rays_o[ray_indices] + dirs * z[:, None]
    some_normals = return_normal and (normal_rays is not None or normal_weight_min > 0.0)
    out = _eval_field(field_fn, points, times[ray_indices], return_normal and not some_normals, chunk_size)
    rgb = color_fn(out, points, dirs, ray_indices)
    density = out["density"].reshape(-1) * (0.0 if empty else 1.0)

    # 4. Composite (nerfacc): batched ops on the dense layout, packed ops otherwise.
    comp = _composite(density, rgb, z, out.get("normal"), t_starts, t_ends, mask, ray_indices, n_rays)
    skipped = None
    if some_normals:  # 4b. normals only where asked and where they weigh: sum w n over those samples
        out["normal"], skipped = _some_normals(
            field_fn, normal_fn, points, times[ray_indices], out["density"], comp["weights"], ray_indices, n_rays,
            normal_rays, normal_weight_min, chunk_size)
        comp["normal"] = _accumulate(comp["weights"], out["normal"], ray_indices, n_rays)
    bg = torch.zeros_like(comp["rgb"]) if bg_color is None else bg_color.to(comp["rgb"]).expand_as(comp["rgb"])
    comp_normal = None
    if return_normal:
        comp_normal = (F.normalize(comp["normal"], dim=-1) + 1.0) / 2.0 * comp["opacity"]
    return RenderOutput(
        comp_rgb=comp["rgb"] + bg * (1.0 - comp["opacity"]),
        comp_rgb_fg=comp["rgb"],
        comp_rgb_bg=bg,
        opacity=comp["opacity"],
        depth=comp["depth"],
        z_variance=comp["z_variance"],
        weights=comp["weights"][:, None],
        ray_indices=ray_indices,
        t_points=z[:, None],
        t_intervals=(t_ends - t_starts if mask is None else (t_ends - t_starts)[mask])[:, None],
        points=points,
        density=density[:, None],
        comp_normal=comp_normal,
        normal=out.get("normal") if return_normal else None,
        normal_skipped_weight=skipped,
    )


def ray_aabb_intersect(
    rays_o: Float[Tensor, "R 3"], rays_d: Float[Tensor, "R 3"], aabb: Float[Tensor, " 6"]
) -> tuple[Float[Tensor, " R"], Float[Tensor, " R"], Bool[Tensor, " R"]]:
    """Slab test: entry and exit ray parameters of the box and whether the ray hits it (``t_max >= max(t_min, 0)``).

    Zero direction components are handled by IEEE infinities (a ray parallel to a slab and inside it gets
    (-inf, inf) for that axis).
    """
    inv_d = 1.0 / rays_d
    t0 = (aabb[:3] - rays_o) * inv_d
    t1 = (aabb[3:] - rays_o) * inv_d
    t_min = torch.minimum(t0, t1).nan_to_num(nan=-torch.inf).amax(dim=-1)
    t_max = torch.maximum(t0, t1).nan_to_num(nan=torch.inf).amin(dim=-1)
    return t_min, t_max, t_max >= t_min.clamp(min=0.0)


def stratified_samples(
    t_near: Float[Tensor, " R"],
    t_far: Float[Tensor, " R"],
    num_samples: int,
    randomized: bool,
    generator: Optional[torch.Generator] = None,
) -> tuple[Float[Tensor, "R S"], Float[Tensor, "R S"], Float[Tensor, "R S"]]:
    """S stratified samples per ray and the intervals they stand for.

    Sample i lies at ``z_i = near + (i + u_i) * (far - near) / S`` with ``u_i ~ U(0, 1)`` (randomized) or 0.5. Its
    interval runs between the midpoints to its neighbours (``near`` / ``far`` at the ends), so the intervals tile
    [near, far] exactly and, without jitter, are the S equal bins with the samples at their centres.

    Returns:
        ``(z, t_starts, t_ends)``, each ``[R, S]``.
    """
    n_rays = t_near.shape[0]
    if randomized:
        u = torch.rand((n_rays, num_samples), generator=generator, device=t_near.device, dtype=t_near.dtype)
    else:
        u = torch.full((n_rays, num_samples), 0.5, device=t_near.device, dtype=t_near.dtype)
    steps = torch.arange(num_samples, device=t_near.device, dtype=t_near.dtype)
    span = (t_far - t_near)[:, None]
    z = t_near[:, None] + (steps + u) * span / num_samples
    mids = (z[:, 1:] + z[:, :-1]) / 2
    t_starts = torch.cat([t_near[:, None], mids], dim=-1)
    t_ends = torch.cat([mids, t_far[:, None]], dim=-1)
    return z, t_starts, t_ends


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _check_inputs(rays_o: Tensor, rays_d: Tensor, times: Tensor, num_samples: int) -> None:
    if rays_o.dim() != 2 or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(
            f"rays_o and rays_d must both be [R, 3]; got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}: flatten "
            "image dimensions first (rays_o.reshape(-1, 3))."
        )
    if times.shape != rays_o.shape[:1]:
        raise ValueError(
            f"times must be [R] = [{rays_o.shape[0]}] (one frame time per ray); got {tuple(times.shape)}: repeat each "
            "frame's time over its rays."
        )
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")


def _near_far(
    rays_o: Tensor, rays_d: Tensor, near: float, far: float, aabb: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-ray [t_near, t_far] and a hit flag; rays that miss get an empty interval (t_far = t_near)."""
    t_near = torch.full_like(rays_o[:, 0], float(near))
    t_far = torch.full_like(rays_o[:, 0], float(far))
    if aabb is not None:
        t_min, t_max, _ = ray_aabb_intersect(rays_o, rays_d, aabb)
        t_near = torch.maximum(t_near, t_min)
        t_far = torch.minimum(t_far, t_max)
    hit = t_far > t_near
    t_far = torch.where(hit, t_far, t_near)
    return t_near, t_far, hit


def _eval_field(field_fn: FieldFn, points: Tensor, times: Tensor, output_normal: bool, chunk_size: int) -> dict:
    if chunk_size <= 0 or points.shape[0] <= chunk_size:
        return field_fn(points, times, output_normal)
    parts = [
        field_fn(points[i : i + chunk_size], times[i : i + chunk_size], output_normal)
        for i in range(0, points.shape[0], chunk_size)
    ]
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def _some_normals(field_fn: FieldFn, normal_fn: Optional[Callable], points: Tensor, times: Tensor, density: Tensor,
                  weights: Tensor, ray_indices: Tensor, n_rays: int, normal_rays: Optional[Tensor],
                  weight_min: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Normals [N, 3] of the samples on ``normal_rays`` with ``weight >= weight_min`` (zero elsewhere, so they add
    nothing to ``sum w n``) and, per ray, the weight of the samples skipped for their weight."""
    wanted = torch.ones_like(weights, dtype=torch.bool) if normal_rays is None else normal_rays[ray_indices]
    keep = wanted & (weights.detach() >= weight_min)
    skipped_w = torch.where(wanted & ~keep, weights.detach(), torch.zeros_like(weights))
    skipped = _accumulate(skipped_w, None, ray_indices, n_rays)
    idx = keep.nonzero().squeeze(-1)
    if idx.numel() == 0:  # nothing selected: no field call (a hash grid cannot take 0 points)
        sub = points.new_zeros(0, 3)
    elif normal_fn is not None:
        step = idx.numel() if chunk_size <= 0 else chunk_size
        sub = torch.cat([normal_fn(points[i], times[i], density[i]) for i in idx.split(step)])
    else:
        sub = _eval_field(field_fn, points[idx], times[idx], True, chunk_size)["normal"]
    normal = torch.zeros(points.shape[0], 3, device=points.device, dtype=sub.dtype).index_put((idx,), sub)
    return normal, skipped


def _accumulate(weights: Tensor, values: Optional[Tensor], ray_indices: Tensor, n_rays: int) -> Tensor:
    import nerfacc

    return nerfacc.accumulate_along_rays(weights, values, ray_indices=ray_indices, n_rays=n_rays)


def _density_of(field_fn: FieldFn) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda points, times: field_fn(points, times, False)["density"]


def _densities(density_fn: Callable, points: Tensor, times: Tensor, chunk_size: int) -> Tensor:
    """[N] densities, without gradient, in chunks of ``chunk_size`` points (0: all at once)."""
    step = points.shape[0] if chunk_size <= 0 else chunk_size
    with torch.no_grad():
        return torch.cat([density_fn(points[i : i + step], times[i : i + step]).reshape(-1)
                          for i in range(0, max(points.shape[0], 1), max(step, 1))])


def _make_sigma_fn(density_fn: Callable, rays_o: Tensor, rays_d: Tensor, times: Tensor, chunk_size: int) -> Callable:
    """nerfacc-style ``sigma_fn(t_starts, t_ends, ray_indices) -> [N]`` at each ray's own time (no gradient)."""

    def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
        z = (t_starts + t_ends)[:, None] / 2
        pts = rays_o[ray_indices] + rays_d[ray_indices] * z
        return _densities(density_fn, pts, times[ray_indices], chunk_size)

    return sigma_fn


def _visible(density_fn: Callable, rays_o: Tensor, rays_d: Tensor, times: Tensor, t_mid: Tensor, t_starts: Tensor,
             t_ends: Tensor, mask: Tensor, alpha_thre: float, chunk_size: int) -> Tensor:
    """Dense layout: which of the ``mask``-ed samples [R, S] have alpha >= ``alpha_thre`` and transmittance >= 1e-4
    (unevaluated samples count as empty), as nerfacc's ``render_visibility_from_density``."""
    from nerfacc import render_visibility_from_density

    pts = rays_o[:, None] + rays_d[:, None] * t_mid[..., None]
    sigma = torch.zeros(mask.shape, device=rays_o.device, dtype=torch.float32)
    sigma[mask] = _densities(density_fn, pts[mask], times[:, None].expand_as(t_mid)[mask], chunk_size).float()
    return render_visibility_from_density(t_starts, t_ends, sigma, early_stop_eps=1e-4, alpha_thre=alpha_thre)


def _composite(
    density: Tensor,
    rgb: Tensor,
    z: Tensor,
    normal: Optional[Tensor],
    t_starts: Tensor,
    t_ends: Tensor,
    mask: Optional[Tensor],
    ray_indices: Tensor,
    n_rays: int,
) -> dict:
    """Weights and per-ray sums. ``mask`` given: dense [R, S] layout (unevaluated samples have density 0) and the
    result's ``weights`` are packed back to the kept samples; ``mask`` None: packed layout."""
    import nerfacc

    if mask is not None:
        sigma = torch.zeros(mask.shape, device=density.device, dtype=density.dtype)
        sigma = sigma.masked_scatter(mask, density)
        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigma)
        weights = weights[mask]
    else:
        weights, _, _ = nerfacc.render_weight_from_density(
            t_starts, t_ends, density, ray_indices=ray_indices, n_rays=n_rays
        )

    def acc(values: Optional[Tensor], w: Tensor = weights) -> Tensor:
        return _accumulate(w, values, ray_indices, n_rays)

    opacity = acc(None)
    depth = acc(z[:, None])
    w_norm = weights / opacity.clamp(min=1e-5)[ray_indices, 0]
    z_mean = acc(z[:, None], w_norm)
    z_var = acc((z[:, None] - z_mean[ray_indices]) ** 2, w_norm) * (opacity > 0.5).to(opacity)
    out = {"weights": weights, "rgb": acc(rgb), "opacity": opacity, "depth": depth, "z_variance": z_var}
    if normal is not None:
        out["normal"] = acc(normal)
    return out
