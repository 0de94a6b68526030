"""A procedural 4D scene with known ground truth, an independent camera and an independent reference renderer.

The scene (analytic density and colour as functions of (x, t), inside the bbox [-1, 1]^3, on a white background):

* a soft sphere (radius 0.22) moving along an arc from (0.45, 0.25, 0) through (0, 0.45, 0) to (-0.45, 0.25, 0),
  bobbing in z, with a colour that varies over its own body (so the colour must move with it);
* a soft ellipsoid at (0, -0.35, 0) whose x and z axes breathe in opposite phase, with a colour changing in time.

It is mirror-asymmetric in y (the sphere lives at y > 0, the ellipsoid at y < 0) and changes with t everywhere, so a
flipped azimuth or a reversed time axis renders a clearly different image.

The camera and the renderer here deliberately share no code with ``cameras.py`` and ``volrend.py``: the synthetic fit
(``benchmarks/fit_synthetic_4d.py``) and the oracle guidances (``oracle.py``) use them as ground truth for our own
camera and renderer code. Camera convention (threestudio's, written out again): z up, camera at
``d (cos e cos a, cos e sin a, sin e)`` looking at the origin, image row 0 at the top, pixel centres at +0.5,
focal length ``0.5 H / tan(fovy / 2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

__all__ = ["SCENE_RADIUS", "SURFACE_DENSITY", "SPHERE_RADIUS", "ELLIPSOID_CENTER", "blobs_scene", "sphere_center",
           "ellipsoid_axes", "blobs_surface_points", "orbit_camera_rays", "reference_render"]

SCENE_RADIUS = 1.2
"""Every ray is integrated over [|o| - SCENE_RADIUS, |o| + SCENE_RADIUS]: the blobs stay within 0.8 of the origin."""


SPHERE_RADIUS = 0.22
ELLIPSOID_CENTER = (0.0, -0.35, 0.0)
SURFACE_DENSITY = 10.0
"""The density at half of each blob's peak: its level set is the sphere of radius ``SPHERE_RADIUS`` and the
ellipsoid's q = 1 surface (the other blob adds < 1e-3 there: the blobs are > 0.19 apart)."""


def sphere_center(times: Float[Tensor, "N 1"]) -> Float[Tensor, "N 3"]:
    """The moving sphere's centre at each time."""
    t = times
    return torch.cat([0.45 * torch.cos(math.pi * t), 0.25 + 0.2 * torch.sin(math.pi * t),
                      0.1 * torch.sin(2 * math.pi * t)], dim=-1)


def ellipsoid_axes(times: Float[Tensor, "N 1"]) -> Float[Tensor, "N 3"]:
    """The breathing ellipsoid's semi-axes at each time (x and z in opposite phase)."""
    breathe = torch.sin(2 * math.pi * times)
    return torch.cat([0.30 + 0.12 * breathe, torch.full_like(times, 0.18), 0.22 - 0.08 * breathe], dim=-1)


def blobs_scene(points: Float[Tensor, "N 3"], times: Float[Tensor, "N"]) -> tuple[Float[Tensor, "N"], Float[Tensor, "N 3"]]:
    """Analytic density ``[N]`` and colour ``[N, 3]`` in [0, 1] of the two blobs at each point's own time in [0, 1]."""
    t = times[:, None]
    # 1. moving soft sphere, colour banded along its own z and x axes
    local1 = points - sphere_center(t)
    sigma1 = 20.0 * torch.sigmoid((SPHERE_RADIUS - local1.norm(dim=-1)) / 0.02)
    rgb1 = torch.stack([torch.full_like(sigma1, 0.9), 0.5 + 1.8 * local1[:, 2], 0.25 + 1.2 * local1[:, 0]], -1)
    # 2. deforming (breathing) ellipsoid, colour changing in time
    breathe = torch.sin(2 * math.pi * t)
    q = ((points - torch.tensor(ELLIPSOID_CENTER, device=points.device)) / ellipsoid_axes(t)).norm(dim=-1)
    sigma2 = 20.0 * torch.sigmoid((1.0 - q) / 0.08)
    rgb2 = torch.cat([torch.full_like(t, 0.15), 0.45 + 0.35 * breathe, torch.full_like(t, 0.85)], dim=-1)
    sigma = sigma1 + sigma2
    rgb = (sigma1[:, None] * rgb1 + sigma2[:, None] * rgb2) / (sigma[:, None] + 1e-6)
    return sigma, rgb.clamp(0.0, 1.0)


def blobs_surface_points(time: float, n: int, generator: torch.Generator) -> Float[Tensor, "M 3"]:
    """The scene's surface {density = SURFACE_DENSITY} at ``time``, sampled uniformly by area: ``n`` points on each
    blob (float64; ``M = 2 n``). The ellipsoid's points are drawn on the unit sphere, mapped by the semi-axes A and
    kept with probability proportional to the mapped area element det(A) |A^-1 u|."""
    t = torch.tensor([[float(time)]], dtype=torch.float64)

    def directions(m: int) -> Tensor:
        return F.normalize(torch.randn(m, 3, generator=generator, dtype=torch.float64), dim=-1)

    sphere = sphere_center(t) + SPHERE_RADIUS * directions(n)
    axes = ellipsoid_axes(t)[0]
    kept = []
    while sum(len(k) for k in kept) < n:
        u = directions(4 * n)
        area = (u / axes).norm(dim=-1)
        keep = torch.rand(4 * n, generator=generator, dtype=torch.float64) * area.max() < area
        kept.append(u[keep])
    ellipsoid = torch.tensor(ELLIPSOID_CENTER, dtype=torch.float64) + torch.cat(kept)[:n] * axes
    return torch.cat([sphere, ellipsoid])


def orbit_camera_rays(
    elevation_deg: Float[Tensor, "B"],
    azimuth_deg: Float[Tensor, "B"],
    distance: Float[Tensor, "B"],
    fovy: Float[Tensor, "B"],
    height: int,
    width: int,
) -> tuple[Float[Tensor, "B H W 3"], Float[Tensor, "B H W 3"]]:
    """Pinhole cameras on spheres around the origin looking at it, z up (module docstring). ``fovy`` in radians.
    Returns unit ``rays_d`` and ``rays_o`` (the eye, repeated); device and dtype follow ``distance``."""
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    eye = distance[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)  # [B, 3]
    forward = F.normalize(-eye, dim=-1)
    z_up = torch.zeros_like(eye)
    z_up[:, 2] = 1.0
    right = F.normalize(torch.linalg.cross(forward, z_up), dim=-1)
    up = torch.linalg.cross(right, forward)
    focal = 0.5 * height / torch.tan(0.5 * fovy)  # [B], pixels
    cols = torch.arange(width, device=eye.device, dtype=eye.dtype) + 0.5 - width / 2
    rows = torch.arange(height, device=eye.device, dtype=eye.dtype) + 0.5 - height / 2
    x = cols[None, None, :, None] / focal[:, None, None, None]  # [B, 1, W, 1], to the right
    y = -rows[None, :, None, None] / focal[:, None, None, None]  # [B, H, 1, 1], row 0 at the top
    dirs = forward[:, None, None] + x * right[:, None, None] + y * up[:, None, None]
    rays_d = F.normalize(dirs, dim=-1)
    return eye[:, None, None].expand_as(rays_d).contiguous(), rays_d


@torch.no_grad()
def reference_render(
    rays_o: Float[Tensor, "R 3"],
    rays_d: Float[Tensor, "R 3"],
    times: Float[Tensor, "R"],
    n_samples: int = 512,
    chunk: int = 8192,
    scene=blobs_scene,
) -> tuple[Float[Tensor, "R 3"], Float[Tensor, "R"]]:
    """Ground-truth colour on white and opacity of each ray (unit ``rays_d``), by midpoint quadrature over
    ``[|o| - SCENE_RADIUS, |o| + SCENE_RADIUS]`` with alpha compositing and a cumprod transmittance. ``scene`` maps
    (points [N, 3], times [N]) to (density [N], colour [N, 3]). No gradient."""
    rgbs, opacities = [], []
    steps = (torch.arange(n_samples, device=rays_o.device, dtype=rays_o.dtype) + 0.5) / n_samples  # [S] in (0, 1)
    for i in range(0, rays_o.shape[0], chunk):
        o, d, t = rays_o[i : i + chunk], rays_d[i : i + chunk], times[i : i + chunk]
        near = o.norm(dim=-1, keepdim=True) - SCENE_RADIUS  # [r, 1]
        delta = 2 * SCENE_RADIUS / n_samples
        z = near + steps[None] * 2 * SCENE_RADIUS  # [r, S]
        pts = o[:, None] + d[:, None] * z[..., None]
        sigma, rgb = scene(pts.reshape(-1, 3), t[:, None].expand(-1, n_samples).reshape(-1))
        alpha = 1.0 - torch.exp(-sigma.view(-1, n_samples) * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=-1), dim=-1)
        w = alpha * trans
        opacity = w.sum(1)
        rgbs.append((w[..., None] * rgb.view(-1, n_samples, 3)).sum(1) + (1.0 - opacity[:, None]))
        opacities.append(opacity)
    return torch.cat(rgbs), torch.cat(opacities)
