"""Meshes of a 4D density field: marching cubes at a time t, surface tracking over t, animated glTF and mesh sequences.

The field is seen only through callables (no network, no threestudio)::

    density_fn(points: [N, 3] world, times: [N] in [0, 1]) -> [N] or [N, 1] density (higher = inside)
    color_fn(points: [N, 3] world, times: [N]) -> [N, 3] RGB in [0, 1]

Evaluation is chunked and runs under ``torch.no_grad()`` on the device of ``bbox``.

An animated mesh needs one topology for all times. ``track_surface`` takes the t = 0 mesh and moves its vertices onto
the level set {density = threshold} at each later time by Newton steps along the (finite-difference) density gradient,
starting from the previous frame's positions. Vertices therefore slide along the surface normal only: each keyframe
has the right shape, but the t = 0 vertex colours may swim tangentially. Tracking cannot follow a change of topology
(a part splitting off, a hole opening) or motion much faster than ``iterations * max_step_voxels`` voxels per substep,
so every frame is checked against that frame's own marching-cubes mesh (distances both ways, in voxels, and the
component count / Euler characteristic); ``MeshAnimation.morph_ok`` is False with a reason when a frame fails, and the
caller then writes the per-frame sequence instead of (or next to) the ``.glb``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from animate124.core.io.atomic_io import save_with

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
    "write_morph_glb",
    "write_mesh_sequence",
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
    max_step_voxels: float = 1.0,
    fd_eps_voxels: float = 0.5,
    tolerance_voxels: float = 1.5,
    quantile: float = 0.999,
    check_topology: bool = True,
    chunk_size: int = 2**15,
    device: Optional[torch.device | str] = None,
) -> TrackedSurface:
    """Move the base mesh's vertices onto {density = threshold} at each time (module docstring).

    For each time after the first, ``substeps`` intermediate times are visited; at each, ``iterations`` Newton steps
    x <- x - (f(x) - tau) grad f / |grad f|^2, each clipped to ``max_step_voxels`` voxels, with central-difference
    gradients of step ``fd_eps_voxels`` voxels. tau = ``base.threshold``.

    Args:
        times: N frame times; times[0] should be ``base.time`` (frame 0 keeps the base vertices).
        reference_meshes: optional N marching-cubes meshes at the same times, for ``surface_error`` and the topology
            check; without them only ``density_residual`` is measured and every frame is reported ok.
        tolerance_voxels: largest ``surface_error`` accepted.
        quantile: of the point-to-surface distances used as ``surface_error`` (1.0 = the maximum).
        check_topology: also fail frames whose reference mesh has another (components, Euler characteristic) than
            ``reference_meshes[0]``; turn off when noise flips tiny handles and the distance check is enough.
        chunk_size: vertices per field call (each costs 7 density evaluations).
        device: where the field is evaluated (default CPU).

    Returns:
        ``TrackedSurface`` (CPU tensors).
    """
    if reference_meshes is not None and len(reference_meshes) != len(times):
        raise ValueError(
            f"reference_meshes has {len(reference_meshes)} meshes for {len(times)} times; pass one per time"
        )
    if iterations < 1 or substeps < 1:
        raise ValueError(f"iterations={iterations} and substeps={substeps} must be >= 1")
    voxel, tau = base.voxel_size, base.threshold
    x = base.vertices.to(device=device, dtype=torch.float32)
    frames, residuals = [base.vertices.clone()], [_density_residual(density_fn, x, float(times[0]), tau)]
    for i in range(1, len(times)):
        t0, t1 = float(times[i - 1]), float(times[i])
        for s in range(1, substeps + 1):
            t = t0 + (t1 - t0) * s / substeps
            for _ in range(iterations):
                x = torch.cat(
                    [
                        _newton_step(density_fn, chunk, t, tau, voxel * fd_eps_voxels, voxel * max_step_voxels)
                        for chunk in x.split(chunk_size)
                    ]
                )
        frames.append(x.cpu().clone())
        residuals.append(_density_residual(density_fn, x, t1, tau))
    errors, ok, reasons = _check_frames(
        base, frames, times, reference_meshes, tolerance_voxels, quantile, check_topology
    )
    return TrackedSurface(frames, torch.tensor(residuals), errors, ok, reasons)


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
# (b) writers
# ----------------------------------------------------------------------------------------------------------------------


def write_morph_glb(
    path: str | os.PathLike,
    base_vertices: Float[Tensor, "V 3"],
    faces: Int[Tensor, "Nf 3"],
    frame_vertices: Sequence[Float[Tensor, "V 3"]],
    vertex_colors: Optional[Float[Tensor, "V 3"]],
    times: Sequence[float],
    interpolation: Literal["STEP", "LINEAR"] = "LINEAR",
    gltf_axes: bool = True,
    with_normals: bool = True,
) -> None:
    """Write ONE binary glTF (.glb): a single mesh with the base topology, N - 1 morph targets, one animation.

    Written with pygltflib, not trimesh: trimesh's glTF exporter cannot write morph targets or weight animations.

    Morph target i (i = 1..N-1) holds the displacement frame_vertices[i] - base_vertices; keyframe k at ``times[k]``
    seconds has one-hot weights (all zero at k = 0, target k at 1 otherwise). ``COLOR_0`` holds the vertex colours.
    POSITION accessors (base and targets) carry min / max as the glTF 2.0 spec requires.

    Args:
        frame_vertices: N >= 2 tensors [V, 3]; frame_vertices[0] must equal base_vertices.
        times: N strictly increasing keyframe times in seconds (e.g. frame time * clip duration).
        interpolation: "LINEAR" blends neighbouring keyframes; "STEP" jumps.
        gltf_axes: give the node the rotation that maps the host's axes onto glTF's (z up -> y up, the reference
            view direction +x -> +z, the front glTF viewers show first; y -> x), so the object stands upright facing
            the viewer; the vertex data itself stays in world coordinates.
        with_normals: add area-weighted vertex normals (``NORMAL``) and their per-frame differences as ``NORMAL``
            morph targets, so viewers shade smoothly (without them glTF viewers use flat shading).
    """
    import pygltflib as gl

    base, tri, frames, colors, keys = _check_glb_inputs(
        base_vertices, faces, frame_vertices, vertex_colors, times, interpolation
    )
    # 1. base attributes, then one target per later frame (displacements from the base)
    blob = _Blob()
    attributes = gl.Attributes(POSITION=blob.add(base, gl.ARRAY_BUFFER, "VEC3", with_bounds=True))
    normals = [_vertex_normals(f, tri) for f in frames] if with_normals else None
    if normals is not None:
        attributes.NORMAL = blob.add(normals[0], gl.ARRAY_BUFFER, "VEC3")
    if colors is not None:
        attributes.COLOR_0 = blob.add(colors, gl.ARRAY_BUFFER, "VEC3")
    indices = blob.add(tri.reshape(-1), gl.ELEMENT_ARRAY_BUFFER, "SCALAR")
    targets = []
    for k in range(1, len(frames)):
        target = gl.Attributes(POSITION=blob.add(frames[k] - base, gl.ARRAY_BUFFER, "VEC3", with_bounds=True))
        if normals is not None:
            target.NORMAL = blob.add(normals[k] - normals[0], gl.ARRAY_BUFFER, "VEC3")
        targets.append(target)
    # 2. the animation: one-hot weights per keyframe on the node's "weights"
    n_targets = len(targets)
    weights = np.zeros((len(keys), n_targets), dtype=np.float32)
    weights[np.arange(1, len(keys)), np.arange(n_targets)] = 1.0
    key_input = blob.add(keys, None, "SCALAR", with_bounds=True)
    key_output = blob.add(weights.reshape(-1), None, "SCALAR")
    rotation = [-0.5, -0.5, -0.5, 0.5] if gltf_axes else None  # (x, y, z, w): -120 degrees about (1, 1, 1)
    gltf = gl.GLTF2(
        scene=0,
        scenes=[gl.Scene(nodes=[0])],
        nodes=[gl.Node(mesh=0, name="animate124", rotation=rotation)],
        meshes=[
            gl.Mesh(
                primitives=[gl.Primitive(attributes=attributes, indices=indices, targets=targets, mode=gl.TRIANGLES)],
                weights=[0.0] * n_targets,
                extras={"targetNames": [f"t{k}" for k in range(1, n_targets + 1)]},
            )
        ],
        animations=[
            gl.Animation(
                name="animate124",
                samplers=[gl.AnimationSampler(input=key_input, output=key_output, interpolation=interpolation)],
                channels=[gl.AnimationChannel(sampler=0, target=gl.AnimationChannelTarget(node=0, path="weights"))],
            )
        ],
        accessors=blob.accessors,
        bufferViews=blob.views,
        buffers=[gl.Buffer(byteLength=len(blob.data))],
    )
    gltf.set_binary_blob(bytes(blob.data))
    save_with(path, gltf.save_binary)


def write_mesh_sequence(
    directory: str | os.PathLike,
    meshes: Sequence[Mesh],
    fmt: Literal["obj", "ply"] = "obj",
    name: str = "mesh",
) -> list[str]:
    """Write one file per mesh, ``{name}_{k:04d}_t{time:.4f}.{fmt}``, with vertex colours (trimesh). Returns paths."""
    import trimesh

    if fmt not in ("obj", "ply"):
        raise ValueError(f"fmt={fmt!r} is not one of 'obj', 'ply'")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, mesh in enumerate(meshes):
        colors = None
        if mesh.vertex_colors is not None:
            colors = (mesh.vertex_colors.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), vertex_colors=colors, process=False)
        path = os.path.join(str(directory), f"{name}_{k:04d}_t{mesh.time:.4f}.{fmt}")
        save_with(path, tm.export)  # temp file + rename: a crash never leaves a half-written mesh
        paths.append(path)
    return paths


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


def _check_frames(base, frames, times, references, tolerance, quantile, check_topology):
    """surface_error per frame and the ok flags / reasons (module docstring)."""
    n = len(frames)
    if references is None:
        return torch.full((n,), float("nan")), torch.ones(n, dtype=torch.bool), []
    from scipy.spatial import cKDTree

    base_topology = topology_signature(references[0]) if check_topology else None
    errors, ok, reasons = [], [], []
    faces = base.faces
    for k, (vertices, ref) in enumerate(zip(frames, references, strict=True)):
        ours = _surface_points(vertices, faces)
        theirs = _surface_points(ref.vertices, ref.faces)
        forward = cKDTree(theirs).query(ours)[0]
        backward = cKDTree(ours).query(theirs)[0]
        error = max(np.quantile(forward, quantile), np.quantile(backward, quantile)) / ref.voxel_size
        topology = topology_signature(ref) if check_topology else base_topology
        errors.append(float(error))
        good = error <= tolerance and topology == base_topology
        ok.append(good)
        if topology != base_topology:
            reasons.append(
                f"t={float(times[k]):.4f}: topology changed (components, Euler characteristic) {base_topology} -> "
                f"{topology}; one morph-target topology cannot follow it"
            )
        elif not good:
            reasons.append(
                f"t={float(times[k]):.4f}: tracked surface is {error:.2f} voxels off the marching-cubes surface "
                f"(tolerance {tolerance}); try more times between keyframes or substeps"
            )
    return torch.tensor(errors), torch.tensor(ok), reasons


def _surface_points(vertices: Tensor, faces: Tensor) -> np.ndarray:
    """Vertices and face centroids (centroids expose triangles stretched across empty space)."""
    v = vertices.double().numpy()
    return np.concatenate([v, v[faces.numpy()].mean(axis=1)])


def _check_glb_inputs(base_vertices, faces, frame_vertices, vertex_colors, times, interpolation):
    if interpolation not in ("STEP", "LINEAR"):
        raise ValueError(f"interpolation={interpolation!r} is not one of 'STEP', 'LINEAR'")
    base = base_vertices.detach().cpu().float().numpy()
    if base.ndim != 2 or base.shape[1] != 3:
        raise ValueError(f"base_vertices has shape {tuple(base.shape)}; expected [V, 3]")
    tri = faces.detach().cpu().numpy().astype(np.uint32)
    if tri.ndim != 2 or tri.shape[1] != 3 or (tri.size and int(tri.max()) >= base.shape[0]):
        raise ValueError(f"faces must be [F, 3] indices < V={base.shape[0]}, got shape {tuple(faces.shape)}")
    if len(frame_vertices) < 2 or len(frame_vertices) != len(times):
        raise ValueError(
            f"got {len(frame_vertices)} frame_vertices and {len(times)} times; pass N >= 2 of each (frame 0 = base)"
        )
    frames = [f.detach().cpu().float().numpy() for f in frame_vertices]
    if any(f.shape != base.shape for f in frames):
        raise ValueError(f"every frame_vertices entry must have the base shape {tuple(base.shape)} (one topology)")
    if not np.allclose(frames[0], base, atol=1e-6):
        raise ValueError("frame_vertices[0] must equal base_vertices (keyframe 0 shows the base mesh)")
    keys = np.asarray(times, dtype=np.float32)
    if not (np.diff(keys) > 0).all():
        raise ValueError(f"times={list(map(float, times))} must be strictly increasing keyframe seconds")
    colors = None
    if vertex_colors is not None:
        colors = vertex_colors.detach().cpu().float().clamp(0, 1).numpy()
        if colors.shape != base.shape:
            raise ValueError(f"vertex_colors has shape {tuple(colors.shape)}; expected {tuple(base.shape)}")
    return base, tri, frames, colors, keys


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (float32), outward for counter-clockwise faces; zero where no face is."""
    import trimesh

    tm = _trimesh(vertices, faces)  # the un-normalised face cross products weigh each face by twice its area
    return trimesh.geometry.mean_vertex_normals(len(vertices), tm.faces, tm.triangles_cross).astype(np.float32)


class _Blob:
    """Accumulates the binary buffer, its buffer views (4-byte aligned) and accessors."""

    _COMPONENT = {np.dtype(np.float32): 5126, np.dtype(np.uint32): 5125}

    def __init__(self) -> None:
        import pygltflib as gl

        self._gl = gl
        self.data = bytearray()
        self.views: list = []
        self.accessors: list = []

    def add(self, array: np.ndarray, target: Optional[int], kind: str, with_bounds: bool = False) -> int:
        gl = self._gl
        array = np.ascontiguousarray(array)
        width = {"SCALAR": 1, "VEC3": 3}[kind]
        count = array.size // width
        self.data += b"\x00" * (-len(self.data) % 4)
        self.views.append(gl.BufferView(buffer=0, byteOffset=len(self.data), byteLength=array.nbytes, target=target))
        self.data += array.tobytes()
        bounds = {}
        if with_bounds:
            rows = array.reshape(count, width)
            bounds = dict(min=rows.min(axis=0).tolist(), max=rows.max(axis=0).tolist())
        self.accessors.append(
            gl.Accessor(
                bufferView=len(self.views) - 1,
                componentType=self._COMPONENT[array.dtype],
                count=count,
                type=kind,
                **bounds,
            )
        )
        return len(self.accessors) - 1
