"""Cameras and rays in threestudio's conventions, without threestudio.

Conventions (identical to ``threestudio/data/uncond.py`` and ``threestudio/utils/ops.py``, so batches built here can be
swapped for the host's):

* world: right-handed, z up; the scene centre is the origin;
* camera position from (elevation e, azimuth a, distance d), angles in degrees, azimuth measured from +x towards +y:
  ``d * (cos e cos a, cos e sin a, sin e)``;
* camera-to-world ``c2w`` [4, 4] is OpenGL-style: columns (right, up, -lookat, position), the camera looks along its -z;
  right = normalize(lookat x up_world), up = normalize(right x lookat);
* pixels are sampled at their centres; the focal length comes from the vertical field of view: f = 0.5 H / tan(fovy/2);
  camera-space direction of pixel (i, j) = ((i + 0.5 - W/2) / f, -(j + 0.5 - H/2) / f, -1); rays_d is normalised;
* the data module takes the projection / mvp matrices from the host (``threestudio.utils.ops``); rays are built here
  because the host's ``get_rays`` draws its ray noise from the global RNG, not from a generator.

Trajectories return a ``CameraTrajectory`` (angles in degrees, c2w, one frame time per camera). Azimuths are returned
unwrapped (they may leave [-180, 180]); everything downstream uses them through sin/cos or wraps them itself.

Upstream bug fixed here: upstream's moving-camera clip (threestudio branch, ``data/video_uncond.py``) added the *elevation* delta
to the azimuth used for the camera, so the returned azimuth disagreed with the camera. Here the azimuth delta moves the
azimuth and the returned angles are the ones the cameras are built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "CameraTrajectory",
    "camera_positions_from_angles",
    "look_at",
    "get_rays",
    "make_trajectory",
    "sample_elevation_deg",
    "sample_clip_trajectory",
    "sample_random_cameras",
    "turntable",
    "fixed_view",
    "orbit_while_animating",
]


@dataclass(frozen=True)
class CameraTrajectory:
    """T cameras, each with the frame time it renders.

    Attributes:
        elevation_deg, azimuth_deg: [T] degrees; azimuth from +x towards +y, unwrapped.
        distance: [T] distance from the origin.
        fovy_deg: [T] vertical field of view in degrees.
        c2w: [T, 4, 4] OpenGL camera-to-world matrices (module docstring).
        times: [T] frame times in [0, 1].
    """

    elevation_deg: Float[Tensor, "T"]
    azimuth_deg: Float[Tensor, "T"]
    distance: Float[Tensor, "T"]
    fovy_deg: Float[Tensor, "T"]
    c2w: Float[Tensor, "T 4 4"]
    times: Float[Tensor, "T"]

    @property
    def camera_positions(self) -> Float[Tensor, "T 3"]:
        return self.c2w[:, :3, 3]

    @property
    def fovy(self) -> Float[Tensor, "T"]:
        """Vertical field of view in radians (the host's batch key ``fovy``)."""
        return torch.deg2rad(self.fovy_deg)

    def __len__(self) -> int:
        return self.times.shape[0]


# ----------------------------------------------------------------------------------------------------------------------
# Camera math (threestudio conventions)
# ----------------------------------------------------------------------------------------------------------------------


def camera_positions_from_angles(
    elevation_deg: Float[Tensor, "T"], azimuth_deg: Float[Tensor, "T"], distance: Float[Tensor, "T"]
) -> Float[Tensor, "T 3"]:
    """Spherical (degrees, z up, azimuth from +x towards +y) to Cartesian: d (cos e cos a, cos e sin a, sin e)."""
    elevation, azimuth = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


def look_at(
    positions: Float[Tensor, "T 3"],
    center: Optional[Float[Tensor, "T 3"]] = None,
    up: Optional[Float[Tensor, "T 3"]] = None,
) -> Float[Tensor, "T 4 4"]:
    """OpenGL camera-to-world matrices looking from ``positions`` at ``center`` (default origin), world up ``up``
    (default +z). Degenerate when the view direction is parallel to ``up`` (elevation +-90 degrees)."""
    if center is None:
        center = torch.zeros_like(positions)
    if up is None:
        up = torch.zeros_like(positions)
        up[:, 2] = 1.0
    lookat = F.normalize(center - positions, dim=-1)
    right = F.normalize(torch.cross(lookat, up, dim=-1), dim=-1)
    cam_up = F.normalize(torch.cross(right, lookat, dim=-1), dim=-1)
    c2w = torch.zeros(positions.shape[0], 4, 4, device=positions.device, dtype=positions.dtype)
    c2w[:, :3, :3] = torch.stack([right, cam_up, -lookat], dim=-1)
    c2w[:, :3, 3] = positions
    c2w[:, 3, 3] = 1.0
    return c2w


def get_rays(
    c2w: Float[Tensor, "T 4 4"],
    fovy: Float[Tensor, "T"],
    height: int,
    width: int,
    normalize: bool = True,
    noise_scale: float = 0.0,
    generator: Optional[torch.Generator] = None,
    offsets: Optional[Float[Tensor, "2 3"]] = None,
) -> tuple[Float[Tensor, "T H W 3"], Float[Tensor, "T H W 3"]]:
    """World-space rays of every pixel, as the host's data modules build them.

    Args:
        c2w: [T, 4, 4] camera-to-world; device and dtype of the rays follow it.
        fovy: [T] vertical field of view in radians.
        height, width: image size in pixels.
        normalize: unit-length ``rays_d`` (the host's default and what its renderers need).
        noise_scale: std of one random 3-vector added to all origins and one to all directions (the host's
            ``rays_noise_scale`` for the reference view); drawn on CPU from ``generator`` (:func:`ray_offsets`).
        offsets: [2, 3] origin and direction offsets drawn earlier with :func:`ray_offsets` (instead of
            ``noise_scale``: the draw on the CPU, the rays where ``c2w`` lives).

    Returns:
        rays_o, rays_d: [T, H, W, 3].
    """
    # camera-space directions ((i - W/2) / f, -(j - H/2) / f, -1) at pixel centres, f = 0.5 H / tan(fovy / 2)
    i, j = torch.meshgrid(
        torch.arange(width, device=c2w.device, dtype=c2w.dtype) + 0.5,
        torch.arange(height, device=c2w.device, dtype=c2w.dtype) + 0.5,
        indexing="xy",
    )
    directions = torch.stack([i - width / 2, -(j - height / 2), -torch.ones_like(i)], dim=-1)
    directions = directions[None].repeat(c2w.shape[0], 1, 1, 1)
    focal = (0.5 * height / torch.tan(0.5 * fovy)).to(c2w)
    directions[..., :2] = directions[..., :2] / focal[:, None, None, None]
    rays_d = (directions[:, :, :, None, :] * c2w[:, None, None, :3, :3]).sum(-1)
    rays_o = c2w[:, None, None, :3, 3].expand(rays_d.shape)
    if offsets is None and noise_scale > 0:
        offsets = ray_offsets(noise_scale, generator)
    if offsets is not None:
        offsets = offsets.to(c2w)
        rays_o, rays_d = rays_o + offsets[0], rays_d + offsets[1]
    if normalize:
        rays_d = F.normalize(rays_d, dim=-1)
    return rays_o, rays_d


def ray_offsets(noise_scale: float, generator: Optional[torch.Generator] = None) -> Float[Tensor, "2 3"]:
    """The origin and direction offsets of :func:`get_rays`' ``noise_scale`` (one float64 draw from ``generator``,
    scaled in float32)."""
    return torch.randn(2, 3, generator=generator, dtype=torch.float64).float() * noise_scale


def make_trajectory(
    elevation_deg: Float[Tensor, "T"],
    azimuth_deg: Float[Tensor, "T"],
    distance: Float[Tensor, "T"],
    times: Float[Tensor, "T"],
    fovy_deg: float | Float[Tensor, "T"] = 40.0,
) -> CameraTrajectory:
    """Cameras looking at the origin (z up) from the given angles; all inputs [T] (same device and dtype)."""
    fovy = torch.as_tensor(fovy_deg, device=times.device, dtype=times.dtype).expand(times.shape).clone()
    c2w = look_at(camera_positions_from_angles(elevation_deg, azimuth_deg, distance))
    return CameraTrajectory(elevation_deg, azimuth_deg, distance, fovy, c2w, times)


# ----------------------------------------------------------------------------------------------------------------------
# Random cameras (training)
# ----------------------------------------------------------------------------------------------------------------------


def sample_elevation_deg(
    n: int,
    elevation_range: Sequence[float] = (-45.0, 45.0),
    uniform_sphere_prob: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Float[Tensor, "B"]:
    """n elevations in degrees, the host's way: one coin for the whole batch; with probability
    1 - ``uniform_sphere_prob`` uniform in degrees, otherwise uniform on the sphere's area (sin e uniform)."""
    lo, hi = _check_range("elevation_range", elevation_range, -90.0, 90.0)
    coin = float(_rand(1, generator))
    u = _rand(n, generator)
    if coin >= uniform_sphere_prob:
        return (lo + u * (hi - lo)).float()
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    return torch.rad2deg(torch.asin((s_lo + u * (s_hi - s_lo)).clamp(-1.0, 1.0))).float()


def sample_clip_trajectory(
    times: Float[Tensor, "T"],
    elevation_range: Sequence[float] = (-45.0, 45.0),
    azimuth_range: Sequence[float] = (-180.0, 180.0),
    distance_range: Sequence[float] = (2.5, 2.5),
    fovy_deg: float = 40.0,
    elevation_delta_range: Sequence[float] = (-180.0 / 256, 180.0 / 256),
    azimuth_delta_range: Sequence[float] = (-180.0 / 32, 180.0 / 32),
    distance_delta_range: Sequence[float] = (0.0, 0.0),
    delta_mode: Literal["per_frame", "total"] = "per_frame",
    fixed_camera_prob: float = 0.0,
    uniform_sphere_prob: float = 0.5,
    elevation_limit_deg: float = 89.0,
    generator: Optional[torch.Generator] = None,
) -> CameraTrajectory:
    """One camera per frame of a training clip: a start camera plus linear elevation / azimuth / distance drifts.

    Frame f of T uses e_f = e_0 + s_f * de, a_f = a_0 + s_f * da, d_f = d_0 + s_f * dd, with one (de, da, dd) drawn
    uniformly from the ``*_delta_range`` per clip, and s_f = f for ``delta_mode="per_frame"`` (deltas are degrees per
    frame, upstream threestudio's reading: defaults +-180/256 and +-180/32 degrees per frame for 16 frames) or
    s_f = f / (T - 1) for ``"total"`` (deltas are the change from the first to the last frame; upstream main draws
    +-45 / +-90 degrees but stops at 15/16 of them). With probability ``fixed_camera_prob`` all deltas are 0 (upstream
    main: 0.1; upstream threestudio: 0). e_0 follows ``sample_elevation_deg``; a_0, d_0 are uniform in their ranges.

    Args:
        times: [T] the clip's frame times (``sample_frame_times(...).times``); the cameras follow its device / dtype.
        elevation_limit_deg: per-frame elevations are clamped to +-this (the look-at is degenerate at +-90).
        generator: CPU generator for every draw.

    Returns:
        ``CameraTrajectory`` of T cameras; the returned angles are exactly the ones the cameras were built from.
    """
    if delta_mode not in ("per_frame", "total"):
        raise ValueError(f"delta_mode={delta_mode!r} is not one of 'per_frame', 'total'")
    _check_prob("fixed_camera_prob", fixed_camera_prob)
    n = times.shape[0]
    # 1. start camera
    e0 = sample_elevation_deg(1, elevation_range, uniform_sphere_prob, generator)
    a0, d0 = (
        _uniform_in("azimuth_range", azimuth_range, 1, generator),
        _uniform_in("distance_range", distance_range, 1, generator, lower=0.0),
    )
    # 2. one drift per clip (zero for a fixed camera)
    de = _uniform_in("elevation_delta_range", elevation_delta_range, 1, generator)
    da = _uniform_in("azimuth_delta_range", azimuth_delta_range, 1, generator)
    dd = _uniform_in("distance_delta_range", distance_delta_range, 1, generator)
    if float(_rand(1, generator)) < fixed_camera_prob:
        de, da, dd = torch.zeros_like(de), torch.zeros_like(da), torch.zeros_like(dd)
    # 3. per-frame angles: the azimuth moves by the azimuth delta (upstream used the elevation delta here)
    s = torch.arange(n, dtype=torch.float64)
    if delta_mode == "total":
        s = s / max(n - 1, 1)
    elevation = (e0.double() + s * de.double()).clamp(-elevation_limit_deg, elevation_limit_deg)
    azimuth = a0.double() + s * da.double()
    distance = d0.double() + s * dd.double()
    if float(distance.min()) <= 0.0:
        raise ValueError(
            f"distance_delta_range={list(distance_delta_range)} moves the camera to distance "
            f"{float(distance.min()):.3g} <= 0; shrink the delta or raise distance_range"
        )
    like = dict(device=times.device, dtype=times.dtype)
    return make_trajectory(elevation.to(**like), azimuth.to(**like), distance.to(**like), times, fovy_deg)


def sample_random_cameras(
    n: int,
    time: float = 0.0,
    elevation_range: Sequence[float] = (-45.0, 45.0),
    azimuth_range: Sequence[float] = (-180.0, 180.0),
    distance_range: Sequence[float] = (2.5, 2.5),
    fovy_range: Sequence[float] = (40.0, 40.0),
    uniform_sphere_prob: float = 0.5,
    batch_uniform_azimuth: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> CameraTrajectory:
    """n independent random cameras at one frame time (the 3-D prior's view at t = 0), like the host's
    ``RandomCameraIterableDataset`` without perturbations: elevation by ``sample_elevation_deg``; azimuth uniform, or
    stratified over the batch (one draw per 1/n of the range, the host's ``batch_uniform_azimuth``); distance and fovy
    uniform in their ranges."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 cameras")
    elevation = sample_elevation_deg(n, elevation_range, uniform_sphere_prob, generator).double()
    a_lo, a_hi = _check_range("azimuth_range", azimuth_range)
    u = _rand(n, generator)
    if batch_uniform_azimuth:
        u = (u + torch.arange(n, dtype=torch.float64)) / n
    azimuth = a_lo + u * (a_hi - a_lo)
    distance = _uniform_in("distance_range", distance_range, n, generator, lower=0.0).double()
    fovy = _uniform_in("fovy_range", fovy_range, n, generator, lower=0.0).double()
    like = dict(device=device, dtype=dtype)
    times = torch.full((n,), float(time), **like)
    return make_trajectory(elevation.to(**like), azimuth.to(**like), distance.to(**like), times, fovy.to(**like))


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation trajectories
# ----------------------------------------------------------------------------------------------------------------------


def turntable(
    n_views: int,
    time: float = 0.0,
    elevation_deg: float = 0.0,
    distance: float = 2.5,
    fovy_deg: float = 40.0,
    start_azimuth_deg: float = 0.0,
    endpoint: bool = False,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> CameraTrajectory:
    """n views around the full circle at one frame time. ``endpoint=False``: azimuths start + 360 k / n (no repeated
    view, the host's validation orbit); ``True``: start + 360 k / (n - 1), the last view repeats the first (the host's
    test orbit, linspace(0, 360, n))."""
    s = _fractions(n_views, endpoint)
    azimuth = start_azimuth_deg + 360.0 * s
    return _eval_trajectory(elevation_deg, azimuth, distance, torch.full_like(s, float(time)), fovy_deg, device, dtype)


def fixed_view(
    n_frames: int,
    azimuth_deg: float = 0.0,
    elevation_deg: float = 0.0,
    distance: float = 2.5,
    fovy_deg: float = 40.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> CameraTrajectory:
    """One camera (default: the reference view, azimuth 0) over n frame times linspace(t_start, t_end, n)."""
    s = _fractions(n_frames, True)
    azimuth = torch.full_like(s, float(azimuth_deg))
    return _eval_trajectory(elevation_deg, azimuth, distance, t_start + (t_end - t_start) * s, fovy_deg, device, dtype)


def orbit_while_animating(
    n_views: int,
    elevation_deg: float = 0.0,
    distance: float = 2.5,
    fovy_deg: float = 40.0,
    start_azimuth_deg: float = 0.0,
    sweep_deg: float = 360.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> CameraTrajectory:
    """Azimuth and time advance together: view k of n has azimuth start + sweep * k / (n - 1) and time
    t_start + (t_end - t_start) * k / (n - 1) (both ends included)."""
    s = _fractions(n_views, True)
    azimuth = start_azimuth_deg + sweep_deg * s
    return _eval_trajectory(elevation_deg, azimuth, distance, t_start + (t_end - t_start) * s, fovy_deg, device, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _eval_trajectory(elevation_deg, azimuth, distance, times, fovy_deg, device, dtype) -> CameraTrajectory:
    if not -90.0 < elevation_deg < 90.0:
        raise ValueError(f"elevation_deg={elevation_deg} must lie in (-90, 90): the z-up look-at is degenerate at +-90")
    if distance <= 0:
        raise ValueError(f"distance={distance} must be > 0")
    if float(times.min()) < 0.0 or float(times.max()) > 1.0:
        raise ValueError(f"frame times must lie in [0, 1], got {float(times.min())} .. {float(times.max())}")
    like = dict(device=device, dtype=dtype)
    elevation = torch.full_like(azimuth, float(elevation_deg))
    distances = torch.full_like(azimuth, float(distance))
    return make_trajectory(elevation.to(**like), azimuth.to(**like), distances.to(**like), times.to(**like), fovy_deg)


def _fractions(n: int, endpoint: bool) -> Tensor:
    """k / (n - 1) (endpoint) or k / n for k < n, in float64; [0] when n == 1."""
    if n < 1:
        raise ValueError(f"number of views/frames n={n} must be >= 1")
    k = torch.arange(n, dtype=torch.float64)
    return k / max(n - 1, 1) if endpoint else k / n


def _rand(n: int, generator: Optional[torch.Generator]) -> Tensor:
    """n values of U[0, 1) in float64: every draw of the random cameras (a test replaces it to script the draws)."""
    return torch.rand((n,), generator=generator, dtype=torch.float64)


def _uniform_in(name, bounds, n, generator, lower=None) -> Tensor:
    lo, hi = _check_range(name, bounds, lower)
    return lo + _rand(n, generator) * (hi - lo)


def _check_range(name, bounds, lower=None, upper=None) -> tuple[float, float]:
    if len(bounds) != 2 or float(bounds[0]) > float(bounds[1]):
        raise ValueError(f"{name}={list(bounds)} must be [low, high] with low <= high")
    lo, hi = float(bounds[0]), float(bounds[1])
    if (lower is not None and lo < lower) or (upper is not None and hi > upper):
        raise ValueError(f"{name}={list(bounds)} must lie within [{lower}, {upper}]")
    return lo, hi


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}={p} must be a probability in [0, 1]")
