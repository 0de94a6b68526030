"""How far an exported mesh is from a known surface: area-uniform samples and the symmetric Chamfer distance.

Used by the export-fidelity check (``benchmarks/export_fidelity.py``), which compares each exported time's mesh with
the analytic surface of the synthetic 4D scene.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["sample_mesh_surface", "chamfer"]


def sample_mesh_surface(
    vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "Nf 3"], n: int, generator: torch.Generator
) -> Float[Tensor, "n 3"]:
    """``n`` points uniformly distributed by area over the triangles (float64): a face drawn with probability
    proportional to its area, then a uniform point in it (folded barycentric coordinates)."""
    tri = vertices.double()[faces]  # [F, 3, 3]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1)
    if not bool(area.sum() > 0):
        raise ValueError("the mesh has no face of non-zero area: nothing to sample")
    pick = torch.multinomial(area, n, replacement=True, generator=generator)
    r = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    r = torch.where(r.sum(-1, keepdim=True) > 1, 1 - r, r)  # fold the outer half of the square onto the triangle
    a, b, c = tri[pick, 0], tri[pick, 1], tri[pick, 2]
    return a + r[:, :1] * (b - a) + r[:, 1:] * (c - a)


def chamfer(a: Float[Tensor, "A 3"], b: Float[Tensor, "B 3"]) -> tuple[float, float, float]:
    """(mean distance from a to b, mean from b to a, their average = the symmetric Chamfer distance), in the units
    of the points (nearest neighbours, exact)."""
    from scipy.spatial import cKDTree

    a_np, b_np = a.double().numpy(), b.double().numpy()
    forward = float(cKDTree(b_np).query(a_np)[0].mean())
    backward = float(cKDTree(a_np).query(b_np)[0].mean())
    return forward, backward, 0.5 * (forward + backward)
