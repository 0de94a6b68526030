"""Surfaces of a 4D density field: marching cubes at a time t and one topology tracked over t.

The files are written by :mod:`animate124.core.export.writers`.

The field is seen only through callables (no network, no threestudio)::

    density_fn(points: [N, 3] world, times: [N] in [0, 1]) -> [N] or [N, 1] density (higher = inside)
    color_fn(points: [N, 3] world, times: [N]) -> [N, 3] RGB in [0, 1]

Evaluation is chunked and runs under ``torch.no_grad()`` on the device of ``bbox``.

An animated mesh needs one topology for all times. ``track_surface`` takes the t = 0 mesh and moves its vertices onto
the level set {density = threshold} at each later time by Newton steps along the (finite-difference) density gradient,
starting from the previous frame's positions. Newton steps move vertices along the surface normal only, so a part
that travels far would see its vertices crowd on its trailing side (and its colours swim): with reference meshes,
each connected component is first translated by the shift of its matching reference component's area-weighted
centroid, then projected. A rigidly moving part is thus followed exactly (its colours move with it); a deforming one
keeps its shape, its t = 0 colours may swim tangentially. Tracking cannot follow a change of topology
(a part splitting off, a hole opening) or motion much faster than ``iterations * max_step_voxels`` voxels per substep
beyond what the component shift explains,
so every frame is checked against that frame's own marching-cubes mesh (distances both ways, in voxels, and the
component count / Euler characteristic); ``MeshAnimation.morph_ok`` is False with a reason when a frame fails, and the
caller then writes the per-frame sequence instead of (or next to) the ``.glb``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "DensityFn",
    "ColorFn",
    "Mesh",
    "TrackedSurface",
    "MeshAnimation",
    "extract_mesh",
    "track_surface",
    "build_mesh_animation",
    "topology_signature",
    "component_centroids",
]

DensityFn = Callable[[Tensor, Tensor], Tensor]
ColorFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in world coordinates (CPU tensors).

    Attributes:
        vertices: [V, 3] float32.
        faces: [F, 3] int64, counter-clockwise seen from outside (normals point towards lower density).
        vertex_colors: [V, 3] float32 in [0, 1], or None.
        time: the frame time the mesh was extracted at.
        threshold: the density level of the surface.
        voxel_size: the marching-cubes grid spacing (largest over the axes).
    """

    vertices: Float[Tensor, "V 3"]
    faces: Int[Tensor, "Nf 3"]
    vertex_colors: Optional[Float[Tensor, "V 3"]]
    time: float
    threshold: float
    voxel_size: float


@dataclass(frozen=True)
class TrackedSurface:
    """The t = 0 topology followed over time.

    Attributes:
        frame_vertices: N tensors [V, 3], one per time; frame 0 is the base mesh's vertices.
        density_residual: [N] mean |density(x, t) - threshold| over the tracked vertices.
        surface_error: [N] in voxels, the ``quantile`` of the distances from the tracked mesh (vertices and face
            centroids) to the reference mesh of that time and back (the larger of the two); NaN without references.
        ok: [N] bool, surface_error <= tolerance and (with references) the same topology signature as the base.
        reasons: one line per failed frame.
    """

    frame_vertices: list[Float[Tensor, "V 3"]]
    density_residual: Float[Tensor, "N"]
    surface_error: Float[Tensor, "N"]
    ok: Tensor
    reasons: list[str]


@dataclass(frozen=True)
class MeshAnimation:
    """Everything an exporter writes: per-time marching-cubes meshes and, when ``morph_ok``, a tracked topology."""

    meshes: list[Mesh]
    tracked: TrackedSurface
    morph_ok: bool
    reason: str


# ----------------------------------------------------------------------------------------------------------------------
# (a) marching cubes
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_mesh(
    density_fn: DensityFn,
    bbox: Float[Tensor, "2 3"],
    resolution: int = 128,
    time: float = 0.0,
    threshold: float | Literal["auto"] = "auto",
    color_fn: Optional[ColorFn] = None,
    chunk_size: int = 2**18,
    min_component_fraction: float = 0.0,
) -> Mesh:
    """Marching cubes on ``density_fn`` at one time over a regular grid spanning ``bbox``.

    Args:
        bbox: [2, 3] (min corner, max corner) in world units; the grid has ``resolution`` samples per axis including
            both corners, so the voxel size is (max - min) / (resolution - 1). Evaluation runs on ``bbox.device``.
        time: frame time in [0, 1] passed to the callables.
        threshold: density level of the surface, or "auto" = the mean of the grid values above 1e-5 (the host's
            ``isosurface_threshold: auto``).
        color_fn: optional; evaluated at the vertices (chunked) for ``vertex_colors``.
        min_component_fraction: drop connected components with fewer faces than this fraction of all faces (the
            host's outlier removal uses 0.01); 0 keeps everything.

    Returns:
        ``Mesh`` on CPU. Raises ValueError when the level is outside the field's range (no surface).
    """
    from skimage.measure import marching_cubes

    if resolution < 2:
        raise ValueError(f"resolution={resolution} must be >= 2 samples per axis")
    lo, hi = bbox[0].float(), bbox[1].float()
    if not bool((hi > lo).all()):
        raise ValueError(f"bbox={bbox.tolist()} must be [min corner, max corner] with max > min on every axis")
    # 1. sample the field on the grid (x-major, 'ij' indexing); points are made per chunk to bound memory
    field = _evaluate_grid(density_fn, lo.to(bbox.device), hi.to(bbox.device), resolution, time, chunk_size)
    level = _resolve_threshold(field, threshold)
    # 2. marching cubes in grid units -> world; "ascent" orients faces so normals point to lower density (outwards)
    spacing = ((hi - lo) / (resolution - 1)).tolist()
    volume = field.double().cpu().numpy()
    if not volume.min() < level < volume.max():
        raise ValueError(
            f"threshold={level:.6g} lies outside the field's range [{volume.min():.6g}, {volume.max():.6g}] at "
            f"t={time}: no surface; pass a threshold inside the range or check the bbox"
        )
    verts, faces, _, _ = marching_cubes(volume, level=level, spacing=tuple(spacing), gradient_direction="ascent")
    vertices = torch.from_numpy(verts.astype(np.float32)) + lo.cpu()
    faces_t = torch.from_numpy(faces.astype(np.int64))
    # 3. optional outlier removal, then colours
    if min_component_fraction > 0:
        vertices, faces_t = _drop_small_components(vertices, faces_t, min_component_fraction)
    colors = None
    if color_fn is not None:
        colors = _evaluate(color_fn, vertices.to(bbox.device), time, chunk_size, channels=3).float().clamp(0, 1).cpu()
    return Mesh(vertices, faces_t, colors, float(time), float(level), float(max(spacing)))


def topology_signature(mesh: Mesh) -> tuple[int, int]:
    """(number of connected components, Euler characteristic V - E + F) of the mesh (unreferenced vertices ignored)."""
    import trimesh

    tm = _trimesh(mesh.vertices, mesh.faces)
    return len(trimesh.graph.connected_components(tm.edges)), int(tm.euler_number)


def component_centroids(vertices: Float[Tensor, "V 3"], faces: Int[Tensor, "Nf 3"]) -> np.ndarray:
    """Area-weighted surface centroid of each vertex-connected component, ``[n, 3]`` float64, in the order of each
    component's lowest vertex index (vertices in no face belong to none)."""
    _, face_labels, n = _face_component_labels(faces, vertices.shape[0])
    return _centroids(vertices.double().numpy(), faces.numpy(), face_labels, n)


# ----------------------------------------------------------------------------------------------------------------------
# (c) following the t = 0 surface over time
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def track_surface(
    density_fn: DensityFn,
    base: Mesh,
    times: Sequence[float],
    reference_meshes: Optional[Sequence[Mesh]] = None,
    iterations: int = 10,
    substeps: int = 1,
    max_substeps: int = 8,
    max_step_voxels: float = 1.0,
    fd_eps_voxels: float = 0.5,
    tolerance_voxels: float = 1.5,
    quantile: float = 0.999,
    check_topology: bool = True,
    follow_components: bool = True,
    chunk_size: int = 2**15,
    device: Optional[torch.device | str] = None,
) -> TrackedSurface:
    """Move the base mesh's vertices onto {density = threshold} at each time (module docstring).

    For each time after the first, ``substeps`` intermediate times are visited; at each, ``iterations`` Newton steps
    x <- x - (f(x) - tau) grad f / |grad f|^2, each clipped to ``max_step_voxels`` voxels, with central-difference
    gradients of step ``fd_eps_voxels`` voxels. tau = ``base.threshold``. With reference meshes, a keyframe that fails
    its check is tracked again from the previous keyframe in twice as many substeps, up to ``max_substeps``.

    Args:
        times: N frame times; times[0] should be ``base.time`` (frame 0 keeps the base vertices).
        reference_meshes: optional N marching-cubes meshes at the same times, for ``surface_error`` and the topology
            check; without them only ``density_residual`` is measured and every frame is reported ok.
        tolerance_voxels: largest ``surface_error`` accepted.
        quantile: of the point-to-surface distances used as ``surface_error`` (1.0 = the maximum).
        check_topology: also fail frames whose reference mesh has another (components, Euler characteristic) than
            ``reference_meshes[0]``; turn off when noise flips tiny handles and the distance check is enough.
        follow_components: with reference meshes, translate each connected component by its reference centroid's
            shift (spread evenly over the substeps) before the Newton steps (module docstring); skipped for a frame
            whose reference has another number of components.
        chunk_size: vertices per field call (each costs 7 density evaluations).
        device: where the field is evaluated (default CPU).

    Returns:
        ``TrackedSurface`` (CPU tensors).
    """
    if reference_meshes is not None and len(reference_meshes) != len(times):
        raise ValueError(
            f"reference_meshes has {len(reference_meshes)} meshes for {len(times)} times; pass one per time"
        )
    if iterations < 1 or substeps < 1 or max_substeps < 1:
        raise ValueError(f"iterations={iterations}, substeps={substeps} and max_substeps={max_substeps} must be >= 1")
    voxel, tau = base.voxel_size, base.threshold
    x = base.vertices.to(device=device, dtype=torch.float32)
    frames, residuals = [base.vertices.clone()], [_density_residual(density_fn, x, float(times[0]), tau)]
    labels = None
    if follow_components and reference_meshes is not None:
        labels = _face_component_labels(base.faces, base.vertices.shape[0])
    check = None
    if reference_meshes is not None:
        base_topology = topology_signature(reference_meshes[0]) if check_topology else None
        check = functools.partial(_check_frame, faces=base.faces, base_topology=base_topology,
                                  tolerance=tolerance_voxels, quantile=quantile, check_topology=check_topology)
    step = functools.partial(_newton_step, density_fn, tau=tau, eps=voxel * fd_eps_voxels,
                             max_step=voxel * max_step_voxels)
    first = check(base.vertices, reference=reference_meshes[0], time=times[0]) if check else (float("nan"), True, "")
    errors, ok, reasons = [first[0]], [first[1]], [first[2]] if first[2] else []
    for i in range(1, len(times)):
        t0, t1 = float(times[i - 1]), float(times[i])
        shift = None if labels is None else _component_shift(x.cpu(), base.faces, labels, reference_meshes[i])
        n_sub = substeps
        while True:
            y = _advance(step, x, t0, t1, n_sub, shift, iterations, chunk_size)
            if check is None:
                result = (float("nan"), True, "")
                break
            result = check(y.cpu(), reference=reference_meshes[i], time=t1)
            if result[1] or "topology changed" in result[2] or 2 * n_sub > max_substeps:
                break
            n_sub *= 2  # the motion outran the steps: redo this keyframe in finer substeps
        x = y
        frames.append(x.cpu().clone())
        residuals.append(_density_residual(density_fn, x, t1, tau))
        errors.append(result[0])
        ok.append(result[1])
        if result[2]:
            reasons.append(result[2])
    errors, ok = torch.tensor(errors), torch.tensor(ok)
    return TrackedSurface(frames, torch.tensor(residuals), errors, ok, reasons)


def _advance(step, x: Tensor, t0: float, t1: float, substeps: int, shift, iterations: int, chunk_size: int) -> Tensor:
    """Vertices x from time t0 to t1: per substep, the component shift's share, then Newton steps at that time."""
    for s in range(1, substeps + 1):
        t = t0 + (t1 - t0) * s / substeps
        if shift is not None:
            x = x + shift.to(x) / substeps
        for _ in range(iterations):
            x = torch.cat([step(chunk, t) for chunk in x.split(chunk_size)])
    return x


def build_mesh_animation(
    density_fn: DensityFn,
    bbox: Float[Tensor, "2 3"],
    times: Sequence[float],
    resolution: int = 128,
    threshold: float | Literal["auto"] = "auto",
    color_fn: Optional[ColorFn] = None,
    min_component_fraction: float = 0.01,
    chunk_size: int = 2**18,
    **track_kwargs,
) -> MeshAnimation:
    """Marching cubes at every time (with colours) and the t = times[0] mesh tracked through them.

    "auto" thresholds are resolved once at times[0] and reused, so every frame shows the same level set.
    ``track_kwargs`` go to ``track_surface``. ``morph_ok`` is False (with a one-line ``reason`` naming the first
    failing time) when any frame fails the tracking check: write the per-frame meshes then.
    """
    first = extract_mesh(
        density_fn, bbox, resolution, float(times[0]), threshold, color_fn, chunk_size, min_component_fraction
    )
    meshes = [first] + [
        extract_mesh(
            density_fn, bbox, resolution, float(t), first.threshold, color_fn, chunk_size, min_component_fraction
        )
        for t in times[1:]
    ]
    tracked = track_surface(density_fn, first, times, meshes, device=bbox.device, **track_kwargs)
    morph_ok = bool(tracked.ok.all())
    reason = "" if morph_ok else f"{len(tracked.reasons)} of {len(times)} frames fail: {tracked.reasons[0]}"
    return MeshAnimation(meshes, tracked, morph_ok, reason)


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _evaluate_grid(density_fn, lo: Tensor, hi: Tensor, resolution: int, time: float, chunk_size: int) -> Tensor:
    """Density at lo + (hi - lo) * (i, j, k) / (resolution - 1), returned as [R, R, R] indexed [i, j, k]."""
    r = resolution
    field = torch.empty(r**3, device=lo.device, dtype=torch.float32)
    for start in range(0, r**3, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, r**3), device=lo.device)
        ijk = torch.stack([flat // (r * r), (flat // r) % r, flat % r], dim=-1).float()
        points = lo + (hi - lo) * ijk / (r - 1)
        field[start : start + flat.shape[0]] = _evaluate(density_fn, points, time, chunk_size)
    return field.reshape(r, r, r)


def _evaluate(fn, points: Tensor, time: float, chunk_size: int, channels: int = 1) -> Tensor:
    outputs = []
    for chunk in points.split(chunk_size):
        value = fn(chunk, torch.full((chunk.shape[0],), float(time), device=chunk.device, dtype=chunk.dtype))
        outputs.append(value.reshape(chunk.shape[0], channels).float())
    out = torch.cat(outputs)
    return out[:, 0] if channels == 1 else out


def _resolve_threshold(field: Tensor, threshold) -> float:
    if isinstance(threshold, str):
        if threshold != "auto":
            raise ValueError(f"threshold={threshold!r} must be a number or 'auto'")
        positive = field[field > 1e-5]
        if positive.numel() == 0:
            raise ValueError("threshold='auto' found no density above 1e-5 in the bbox: the field is empty there")
        return float(positive.mean())
    return float(threshold)


def _trimesh(vertices: Tensor | np.ndarray, faces: Tensor | np.ndarray):
    import trimesh

    to_numpy = lambda x: x.numpy() if isinstance(x, Tensor) else x  # noqa: E731
    return trimesh.Trimesh(to_numpy(vertices), to_numpy(faces).astype(np.int64), process=False)


def _drop_small_components(vertices: Tensor, faces: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Keep the faces of vertex-connected components holding at least ``fraction`` of all faces (order kept)."""
    import trimesh

    tm = _trimesh(vertices, faces)
    labels = trimesh.graph.connected_component_labels(tm.edges, node_count=len(tm.vertices))
    face_label = labels[tm.faces[:, 0]]
    tm.update_faces(np.bincount(face_label)[face_label] >= fraction * len(tm.faces))
    tm.remove_unreferenced_vertices()
    return torch.from_numpy(tm.vertices.astype(np.float32)), torch.from_numpy(tm.faces.astype(np.int64))


def _face_component_labels(faces: Tensor, n_vertices: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(vertex labels [V], face labels [F], n) of the vertex-connected components that hold faces; vertices in no
    face get the label n (a padding component that never moves)."""
    import trimesh

    edges = trimesh.geometry.faces_to_edges(faces.numpy())
    raw = trimesh.graph.connected_component_labels(edges, node_count=n_vertices)
    used, compact = np.unique(raw[faces.numpy()[:, 0]], return_inverse=True)
    vertex_labels = np.full(n_vertices, len(used))
    vertex_labels[np.isin(raw, used)] = np.searchsorted(used, raw[np.isin(raw, used)])
    return vertex_labels, compact.reshape(-1), len(used)


def _centroids(vertices: np.ndarray, faces: np.ndarray, face_labels: np.ndarray, n: int) -> np.ndarray:
    """Area-weighted surface centroid of each of the ``n`` labelled components, [n, 3]."""
    tri = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    weight = np.bincount(face_labels, area, minlength=n)[:, None]
    moment = np.stack([np.bincount(face_labels, area * tri[:, :, a].mean(1), minlength=n) for a in range(3)], -1)
    return moment / np.maximum(weight, 1e-30)


def _component_shift(x: Tensor, faces: Tensor, labels, reference: Mesh) -> Optional[Tensor]:
    """Per-vertex translation [V, 3] moving each tracked component's centroid onto its reference component's (matched
    by least total centroid distance); None when the reference has another number of components."""
    from scipy.optimize import linear_sum_assignment

    vertex_labels, face_labels, n = labels
    _, ref_face_labels, ref_n = _face_component_labels(reference.faces, reference.vertices.shape[0])
    if ref_n != n:
        return None
    ours = _centroids(x.double().numpy(), faces.numpy(), face_labels, n)
    theirs = _centroids(reference.vertices.double().numpy(), reference.faces.numpy(), ref_face_labels, n)
    rows, cols = linear_sum_assignment(np.linalg.norm(ours[:, None] - theirs[None], axis=-1))
    shift = np.zeros((n + 1, 3))  # row n: vertices in no face stay
    shift[rows] = theirs[cols] - ours[rows]
    return torch.from_numpy(shift[vertex_labels]).float()


def _newton_step(density_fn, x: Tensor, t: float, tau: float, eps: float, max_step: float) -> Tensor:
    """One clipped Newton step towards {f = tau} along grad f (central differences, 7 evaluations per point)."""
    n = x.shape[0]
    offsets = torch.cat([torch.zeros(1, 3), torch.eye(3) * eps, -torch.eye(3) * eps]).to(x)
    samples = (x[:, None, :] + offsets[None]).reshape(-1, 3)
    times = torch.full((samples.shape[0],), t, device=x.device, dtype=x.dtype)
    f = density_fn(samples, times).reshape(n, 7).to(x.dtype)
    grad = (f[:, 1:4] - f[:, 4:7]) / (2 * eps)
    step = -(f[:, :1] - tau) * grad / (grad.square().sum(-1, keepdim=True) + 1e-12)
    length = step.norm(dim=-1, keepdim=True)
    return x + step * torch.clamp(max_step / (length + 1e-12), max=1.0)


def _density_residual(density_fn, x: Tensor, t: float, tau: float) -> float:
    return float((_evaluate(density_fn, x, t, 2**18) - tau).abs().mean())


def _check_frame(vertices, faces, reference, base_topology, time, tolerance, quantile, check_topology):
    """(surface_error in voxels, ok, reason or "") of one tracked frame against its marching-cubes mesh."""
    from scipy.spatial import cKDTree

    ours = _surface_points(vertices, faces)
    theirs = _surface_points(reference.vertices, reference.faces)
    forward = cKDTree(theirs).query(ours)[0]
    backward = cKDTree(ours).query(theirs)[0]
    error = float(max(np.quantile(forward, quantile), np.quantile(backward, quantile)) / reference.voxel_size)
    topology = topology_signature(reference) if check_topology else base_topology
    if topology != base_topology:
        return error, False, (f"t={float(time):.4f}: topology changed (components, Euler characteristic) "
                              f"{base_topology} -> {topology}; one morph-target topology cannot follow it")
    if error > tolerance:
        return error, False, (f"t={float(time):.4f}: tracked surface is {error:.2f} voxels off the marching-cubes "
                              f"surface (tolerance {tolerance}); try more times between keyframes or max_substeps")
    return error, True, ""


def _surface_points(vertices: Tensor, faces: Tensor) -> np.ndarray:
    """Vertices and face centroids (centroids expose triangles stretched across empty space)."""
    v = vertices.double().numpy()
    return np.concatenate([v, v[faces.numpy()].mean(axis=1)])
