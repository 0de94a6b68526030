"""Files of an exported 4D surface: ONE animated binary glTF (morph targets) and a per-time mesh sequence.

Axes. The host's world frame is z up with the reference view looking from +x. glTF's is y up with its front facing +z.
Both writers map host coordinates (x, y, z) to (y, z, x) by default (:func:`to_y_up`: host +x -> +z, +y -> +x,
+z -> +y; a rotation, so faces keep their winding), baked into the vertex data: the ``.glb`` node has no transform,
and the ``.obj`` / ``.ply`` files hold the same coordinates as the ``.glb``, so any importer shows both upright
and facing the viewer. ``axes="z_up"`` keeps the host frame in the mesh sequence instead.

Material. The ``.glb`` has one PBR metallic-roughness material: base colour factor white times the vertex colours
(``COLOR_0``), metallic 0, roughness 1 by default (glTF's default material, used when none is given, is fully
metallic and renders vertex colours far from the videos'). ``COLOR_0`` is linear by the glTF spec, so the sRGB
albedo the videos show is converted to linear; the mesh-sequence files keep 8-bit sRGB colours, as those formats do.
The material is double-sided when the base mesh is open (a surface cut by the bbox) and single-sided for a closed one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from animate124.core.export.mesh_export import Mesh
from animate124.core.io.atomic_io import save_with

__all__ = ["AXES", "MorphGlb", "to_y_up", "from_y_up", "srgb_to_linear", "write_morph_glb", "read_morph_glb",
           "write_mesh_sequence"]

AXES = ("y_up", "z_up")


@dataclass(frozen=True)
class MorphGlb:
    """What :func:`read_morph_glb` decodes, in the file's axes.

    Attributes:
        faces: [F, 3] int64.
        frames: N arrays [V, 3]: the base positions plus each keyframe's one-hot morph target (frame 0 = the base).
        keys: [N] keyframe seconds.
        colors: [V, 3] linear COLOR_0, or None.
        extras: the animation's extras.
    """

    faces: np.ndarray
    frames: list[np.ndarray]
    keys: np.ndarray
    colors: Optional[np.ndarray]
    extras: dict


def to_y_up(vertices: np.ndarray) -> np.ndarray:
    """Host (x, y, z), z up -> glTF (y, z, x), y up; ``[..., 3]``."""
    return vertices[..., [1, 2, 0]]


def from_y_up(vertices: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_y_up`."""
    return vertices[..., [2, 0, 1]]


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """The sRGB transfer function inverted (IEC 61966-2-1), for values in [0, 1]."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


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
    roughness: float = 1.0,
    double_sided: Optional[bool] = None,
    extras: Optional[dict] = None,
) -> None:
    """Write ONE binary glTF (.glb): a single mesh with the base topology, N - 1 morph targets, one animation.

    Written with pygltflib, not trimesh: trimesh's glTF exporter cannot write morph targets or weight animations.

    Morph target i (i = 1..N-1) holds the displacement frame_vertices[i] - base_vertices; keyframe k at ``times[k]``
    seconds has one-hot weights (all zero at k = 0, target k at 1 otherwise). ``COLOR_0`` holds the vertex colours
    (sRGB in, linear stored; module docstring). POSITION accessors (base and targets) carry min / max as the glTF 2.0
    spec requires.

    Args:
        base_vertices, frame_vertices: in the host's world frame (z up).
        vertex_colors: sRGB albedo in [0, 1], or None (the material's white base colour then).
        frame_vertices: N >= 2 tensors [V, 3]; frame_vertices[0] must equal base_vertices.
        times: N strictly increasing keyframe times in seconds.
        interpolation: "LINEAR" blends neighbouring keyframes; "STEP" jumps.
        gltf_axes: bake :func:`to_y_up` into the vertex data (module docstring); False keeps the host frame.
        with_normals: add area-weighted vertex normals (``NORMAL``) and their per-frame differences as ``NORMAL``
            morph targets, so viewers shade smoothly (without them glTF viewers use flat shading).
        roughness: the material's roughness factor (metallic is 0).
        double_sided: the material's doubleSided; None: True exactly when the base mesh has boundary edges.
        extras: JSON-able application data stored on the animation (e.g. frame rate and frame times).
    """
    import pygltflib as gl

    base, tri, frames, colors, keys = _check_glb_inputs(
        base_vertices, faces, frame_vertices, vertex_colors, times, interpolation
    )
    if gltf_axes:
        base, frames = to_y_up(base), [to_y_up(f) for f in frames]
    # 1. base attributes, then one target per later frame (displacements from the base)
    blob = _Blob()
    attributes = gl.Attributes(POSITION=blob.add(base, gl.ARRAY_BUFFER, "VEC3", with_bounds=True))
    normals = [_unit_normals(f, tri) for f in frames] if with_normals else None
    if normals is not None:
        attributes.NORMAL = blob.add(normals[0], gl.ARRAY_BUFFER, "VEC3")
    if colors is not None:
        attributes.COLOR_0 = blob.add(srgb_to_linear(colors).astype(np.float32), gl.ARRAY_BUFFER, "VEC3")
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
    if double_sided is None:
        double_sided = _has_boundary(tri)
    material = gl.Material(
        name="animate124",
        pbrMetallicRoughness=gl.PbrMetallicRoughness(
            baseColorFactor=[1.0, 1.0, 1.0, 1.0], metallicFactor=0.0, roughnessFactor=float(roughness)
        ),
        doubleSided=bool(double_sided),
    )
    gltf = gl.GLTF2(
        asset=gl.Asset(version="2.0", generator="threestudio-animate124"),
        scene=0,
        scenes=[gl.Scene(nodes=[0])],
        nodes=[gl.Node(mesh=0, name="animate124")],
        meshes=[
            gl.Mesh(
                primitives=[
                    gl.Primitive(
                        attributes=attributes, indices=indices, targets=targets, mode=gl.TRIANGLES, material=0
                    )
                ],
                weights=[0.0] * n_targets,
                extras={"targetNames": [f"t{k}" for k in range(1, n_targets + 1)]},
            )
        ],
        materials=[material],
        animations=[
            gl.Animation(
                name="animate124",
                samplers=[gl.AnimationSampler(input=key_input, output=key_output, interpolation=interpolation)],
                channels=[gl.AnimationChannel(sampler=0, target=gl.AnimationChannelTarget(node=0, path="weights"))],
                extras=dict(extras or {}),
            )
        ],
        accessors=blob.accessors,
        bufferViews=blob.views,
        buffers=[gl.Buffer(byteLength=len(blob.data))],
    )
    gltf.set_binary_blob(bytes(blob.data))
    save_with(path, gltf.save_binary)


def read_morph_glb(path: str | os.PathLike) -> MorphGlb:
    """Decode a ``.glb`` written by :func:`write_morph_glb`: each keyframe's mesh as the blend its weights give."""
    import pygltflib as gl

    gltf = gl.GLTF2().load(str(path))
    blob = gltf.binary_blob()

    def read(index: int) -> np.ndarray:
        acc = gltf.accessors[index]
        view = gltf.bufferViews[acc.bufferView]
        dtype = {5126: np.float32, 5125: np.uint32}[acc.componentType]
        width = {"SCALAR": 1, "VEC3": 3}[acc.type]
        data = np.frombuffer(blob, dtype, acc.count * width, view.byteOffset + (acc.byteOffset or 0))
        return data.reshape(acc.count, width) if width > 1 else data

    (prim,) = gltf.meshes[0].primitives
    base = read(prim.attributes.POSITION).astype(np.float64)
    targets = [read(t["POSITION"] if isinstance(t, dict) else t.POSITION) for t in prim.targets]
    animation = gltf.animations[0]
    sampler = animation.samplers[0]
    keys = read(sampler.input).astype(np.float64)
    weights = read(sampler.output).reshape(len(keys), len(targets))
    frames = [base + sum(w * d for w, d in zip(row, targets)) for row in weights.astype(np.float64)]
    colors = read(prim.attributes.COLOR_0) if prim.attributes.COLOR_0 is not None else None
    faces = read(prim.indices).reshape(-1, 3).astype(np.int64)
    return MorphGlb(faces, frames, keys, colors, dict(animation.extras or {}))


def write_mesh_sequence(
    directory: str | os.PathLike,
    meshes: Sequence[Mesh],
    fmt: Literal["obj", "ply"] = "obj",
    name: str = "mesh",
    axes: Literal["y_up", "z_up"] = "y_up",
) -> list[str]:
    """Write one file per mesh, ``{name}_{k:04d}_t{time:.4f}.{fmt}``, with 8-bit sRGB vertex colours (trimesh).

    ``axes``: "y_up" = the ``.glb``'s frame (:func:`to_y_up`), "z_up" = the host's world frame. Returns the paths."""
    import trimesh

    if fmt not in ("obj", "ply"):
        raise ValueError(f"fmt={fmt!r} is not one of 'obj', 'ply'")
    if axes not in AXES:
        raise ValueError(f"axes={axes!r} is not one of {AXES}")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, mesh in enumerate(meshes):
        colors = None
        if mesh.vertex_colors is not None:
            colors = (mesh.vertex_colors.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        vertices = mesh.vertices.numpy()
        if axes == "y_up":
            vertices = to_y_up(vertices)
        tm = trimesh.Trimesh(vertices, mesh.faces.numpy(), vertex_colors=colors, process=False)
        path = os.path.join(str(directory), f"{name}_{k:04d}_t{mesh.time:.4f}.{fmt}")
        save_with(path, tm.export)  # temp file + rename: a crash never leaves a half-written mesh
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


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


def _has_boundary(faces: np.ndarray) -> bool:
    """Whether some edge belongs to one face only (an open surface)."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool((counts == 1).any())


def _vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (float32), outward for counter-clockwise faces; zero where no face is."""
    import trimesh

    # the un-normalised face cross products weigh each face by twice its area
    tm = trimesh.Trimesh(vertices, faces.astype(np.int64), process=False)
    return trimesh.geometry.mean_vertex_normals(len(vertices), tm.faces, tm.triangles_cross).astype(np.float32)


def _unit_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """:func:`_vertex_normals` with +y where a vertex has no face of non-zero area (glTF requires unit normals)."""
    normals = _vertex_normals(vertices, faces)
    normals[np.linalg.norm(normals, axis=1) < 0.5] = (0.0, 1.0, 0.0)
    return normals


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
