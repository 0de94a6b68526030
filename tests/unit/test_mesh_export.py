"""Marching cubes, surface tracking and the animated .glb on analytic fields (spheres: signed distance r - |p - c|,
threshold 0, so every target is known in closed form). The .glb holds y-up coordinates: host (x, y, z) -> (y, z, x)."""

import math

import numpy as np
import pytest
import torch

from animate124.core.export import mesh_export as mx
from animate124.core.export import writers as wr
from animate124.core.export.mesh_export import build_mesh_animation, extract_mesh, topology_signature, track_surface
from animate124.core.export.writers import write_mesh_sequence, write_morph_glb

BBOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
RES = 48  # voxel = 2 / 47 = 0.04255


def sphere(center, radius):
    c = torch.tensor(center, dtype=torch.float32)
    return lambda p, t: radius - (p - c.to(p)).norm(dim=-1)


def moving_sphere(p, t):
    """radius 0.5, centre (0.3 t, 0, 0)."""
    c = torch.stack([0.3 * t, torch.zeros_like(t), torch.zeros_like(t)], dim=-1)
    return 0.5 - (p - c).norm(dim=-1)


def splitting_sphere(p, t):
    """One sphere at t = 0 that splits into two: centres (+-0.45 t, 0, 0), radius 0.5 - 0.15 t (apart for t > 0.8)."""
    d = torch.stack([0.45 * t, torch.zeros_like(t), torch.zeros_like(t)], dim=-1)
    r = 0.5 - 0.15 * t
    return torch.maximum(r - (p - d).norm(dim=-1), r - (p + d).norm(dim=-1))


def xyz_color(p, t):
    return (p + 1) / 2


def _trimesh(mesh):
    import trimesh

    return trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)


@pytest.fixture(scope="module")
def moving():
    return build_mesh_animation(moving_sphere, BBOX, [0.0, 0.5, 1.0], resolution=RES, threshold=0.0, color_fn=xyz_color)


def y_up(v):
    """Host (x, y, z) -> glTF (y, z, x), written out by hand."""
    v = np.asarray(v)
    return np.stack([v[..., 1], v[..., 2], v[..., 0]], -1)


def test_marching_cubes_sphere_radius_volume_orientation_colors():
    mesh = extract_mesh(sphere((0.1, 0.0, -0.2), 0.5), BBOX, RES, threshold=0.0, color_fn=xyz_color)
    voxel = 2.0 / (RES - 1)
    assert mesh.voxel_size == pytest.approx(voxel, rel=1e-6)
    radius = (mesh.vertices - torch.tensor([0.1, 0.0, -0.2])).norm(dim=-1)
    assert (radius - 0.5).abs().max().item() < 0.25 * voxel  # r +- voxel (linear interpolation: much better)
    tm = _trimesh(mesh)
    assert tm.is_watertight and topology_signature(mesh) == (1, 2)
    # outward faces: positive volume close to 4/3 pi r^3 (the inscribed polyhedron is slightly smaller)
    assert tm.volume == pytest.approx(4 / 3 * math.pi * 0.125, rel=0.01)
    torch.testing.assert_close(mesh.vertex_colors, (mesh.vertices + 1) / 2)


def test_chunking_and_auto_threshold():
    # density max(0, 1 - |p|): the mean over grid points inside the unit ball is 1 - E|p| = 1/4 -> surface at r = 3/4
    ball = lambda p, t: torch.relu(1 - p.norm(dim=-1))  # noqa: E731
    mesh = extract_mesh(ball, BBOX, RES)
    assert mesh.threshold == pytest.approx(0.25, abs=0.005)
    assert mesh.vertices.norm(dim=-1).mean().item() == pytest.approx(1 - mesh.threshold, abs=1e-3)
    small_chunks = extract_mesh(ball, BBOX, RES, chunk_size=1000)
    torch.testing.assert_close(small_chunks.vertices, mesh.vertices, rtol=0, atol=0)


def test_small_components_are_dropped():
    two = lambda p, t: torch.maximum(sphere((0, 0, 0), 0.5)(p, t), sphere((0.8, 0.8, 0.8), 0.1)(p, t))  # noqa: E731
    both = extract_mesh(two, BBOX, RES, threshold=0.0)
    assert topology_signature(both) == (2, 4)
    big = extract_mesh(two, BBOX, RES, threshold=0.0, min_component_fraction=0.1)
    assert topology_signature(big) == (1, 2)
    assert big.vertices.norm(dim=-1).max().item() < 0.51


def test_no_surface_raises():
    with pytest.raises(ValueError, match="threshold=2 lies outside the field's range"):
        extract_mesh(sphere((0, 0, 0), 0.5), BBOX, 16, threshold=2.0)
    with pytest.raises(ValueError, match="bbox="):
        extract_mesh(sphere((0, 0, 0), 0.5), BBOX.flip(0), 16, threshold=0.0)


def test_tracking_follows_a_moving_sphere(moving):
    tracked = moving.tracked
    assert moving.morph_ok and moving.reason == "" and tracked.ok.all()
    voxel = moving.meshes[0].voxel_size
    for k, t in enumerate([0.0, 0.5, 1.0]):
        center = torch.tensor([0.3 * t, 0.0, 0.0])
        v = tracked.frame_vertices[k]
        assert ((v - center).norm(dim=-1) - 0.5).abs().max().item() < 0.05 * voxel  # on the sphere of time t
        # the tracked shape moved by the motion: its bounding-box centre is the sphere's centre
        torch.testing.assert_close((v.min(0).values + v.max(0).values) / 2, center, atol=0.1 * voxel, rtol=0)
        assert tracked.surface_error[k].item() < 1.0
    assert tracked.density_residual[1:].max().item() < 1e-6
    # the vertex nearest the +x axis (at y = z = 0.0213, half a voxel off it) moves by the motion along x; it slides
    # radially away from the new centre by less than a voxel sideways (vertices move along normals only)
    v0 = moving.meshes[0].vertices
    pole = torch.where(v0[:, 0] > 0, v0[:, 1:].norm(dim=-1), torch.inf).argmin()
    shift = tracked.frame_vertices[2][pole] - tracked.frame_vertices[0][pole]
    assert shift[0].item() == pytest.approx(0.3, abs=0.005) and shift[1:].abs().max().item() < voxel


def test_topology_change_is_detected():
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    anim = build_mesh_animation(splitting_sphere, BBOX, times, resolution=RES, threshold=0.0)
    assert [topology_signature(m) for m in anim.meshes] == [(1, 2)] * 4 + [(2, 4)]
    assert not anim.morph_ok and "frames fail" in anim.reason
    assert not anim.tracked.ok[-1] and anim.tracked.ok[:2].all()
    assert any(r.startswith("t=1.0000: topology changed") and "(1, 2) -> (2, 4)" in r for r in anim.tracked.reasons)
    # triangles stretched across the gap are far off the two spheres: the distance check alone also fails t = 1
    assert anim.tracked.surface_error[-1].item() > 3.0
    geometric = track_surface(splitting_sphere, anim.meshes[0], times, anim.meshes, check_topology=False)
    assert not geometric.ok[-1] and "t=1.0000: tracked surface is" in geometric.reasons[-1]


def test_motion_too_fast_for_the_tracker_is_reported():
    base = extract_mesh(moving_sphere, BBOX, RES, time=0.0, threshold=0.0)
    refs = [base, extract_mesh(moving_sphere, BBOX, RES, time=1.0, threshold=0.0)]
    # 0.3 / 0.0426 = 7 voxels of motion, but 2 steps of at most 1 voxel, no retries and no component shift
    slow = track_surface(moving_sphere, base, [0.0, 1.0], refs, iterations=2, max_substeps=1, follow_components=False)
    assert not slow.ok[1] and "voxels off the marching-cubes surface" in slow.reasons[0]
    enough = track_surface(moving_sphere, base, [0.0, 1.0], refs, iterations=4, substeps=3, follow_components=False)
    assert enough.ok.all() and enough.reasons == []
    # retries: 1 substep fails, 2 do not (4 steps of 1 voxel each way cannot cover 7 voxels, 8 can)
    retried = track_surface(moving_sphere, base, [0.0, 1.0], refs, iterations=4, max_substeps=2,
                            follow_components=False)
    assert retried.ok.all()
    once = track_surface(moving_sphere, base, [0.0, 1.0], refs, iterations=4, max_substeps=1, follow_components=False)
    assert not once.ok[1]
    # the component shift moves the whole sphere by its centroid's motion (0.3, 0, 0): one Newton step then suffices
    # and every vertex moved by the translation (no tangential sliding)
    shifted = track_surface(moving_sphere, base, [0.0, 1.0], refs, iterations=1, max_substeps=1)
    assert shifted.ok.all()
    moved = shifted.frame_vertices[1] - base.vertices
    torch.testing.assert_close(moved, torch.tensor([0.3, 0.0, 0.0]).expand_as(moved), atol=0.01 * 2 / (RES - 1),
                               rtol=0)
    no_refs = track_surface(moving_sphere, base, [0.0, 1.0])
    assert torch.isnan(no_refs.surface_error).all() and no_refs.ok.all()


def test_morph_glb_exact_motion_roundtrip(tmp_path, moving):
    import pygltflib
    import trimesh

    base = moving.meshes[0]
    motion = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.15, 0.0, 0.05]), torch.tensor([0.3, -0.1, 0.0])]
    frames = [base.vertices + m for m in motion]
    path = tmp_path / "anim.glb"
    write_morph_glb(path, base.vertices, base.faces, frames, base.vertex_colors, [0.0, 1.0, 2.0], interpolation="STEP")

    gltf = pygltflib.GLTF2().load(str(path))
    blob = gltf.binary_blob()

    def read(index, width):
        acc = gltf.accessors[index]
        view = gltf.bufferViews[acc.bufferView]
        dtype = {5126: np.float32, 5125: np.uint32}[acc.componentType]
        data = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=view.byteOffset + (acc.byteOffset or 0))
        return acc, data.reshape(acc.count, width) if width > 1 else data

    prim = gltf.meshes[0].primitives[0]
    assert len(prim.targets) == 2 and gltf.meshes[0].weights == [0.0, 0.0]
    V = base.vertices.shape[0]
    acc, pos = read(prim.attributes.POSITION, 3)
    assert acc.count == V and acc.min is not None and acc.max is not None
    np.testing.assert_allclose(pos, y_up(base.vertices.numpy()))
    np.testing.assert_allclose(acc.min, y_up(base.vertices.min(0).values.numpy()))
    for k, target in enumerate(prim.targets, start=1):
        acc, disp = read(target["POSITION"], 3)
        assert acc.count == V and acc.min is not None and acc.max is not None  # required for POSITION accessors
        np.testing.assert_allclose(disp, np.broadcast_to(y_up(motion[k].numpy()), (V, 3)), atol=1e-6)
        np.testing.assert_allclose(acc.max, y_up(motion[k].numpy()), atol=1e-6)
    # smooth-shading normals: radial on a sphere; a pure translation leaves them unchanged (zero NORMAL targets)
    _, normals = read(prim.attributes.NORMAL, 3)
    radial = y_up(base.vertices.numpy()) / np.linalg.norm(base.vertices.numpy(), axis=1, keepdims=True)
    assert (normals * radial).sum(1).min() > 0.99
    for target in prim.targets:
        np.testing.assert_allclose(read(target["NORMAL"], 3)[1], 0.0, atol=1e-5)
    # COLOR_0 is linear: sRGB c -> ((c + 0.055) / 1.055) ** 2.4 above 0.04045, c / 12.92 below
    _, colors = read(prim.attributes.COLOR_0, 3)
    srgb = base.vertex_colors.double().numpy()
    np.testing.assert_allclose(colors, np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4),
                               rtol=1e-5, atol=1e-7)
    assert wr.srgb_to_linear(np.array([0.5, 1.0, 0.0])).tolist() == pytest.approx([0.214041, 1.0, 0.0], abs=1e-6)
    # the material: PBR, vertex colours times white, not metallic, rough; single-sided on this closed sphere
    assert prim.material == 0 and len(gltf.materials) == 1
    material = gltf.materials[0]
    pbr = material.pbrMetallicRoughness
    assert (pbr.baseColorFactor, pbr.metallicFactor, pbr.roughnessFactor) == ([1.0, 1.0, 1.0, 1.0], 0.0, 1.0)
    assert material.doubleSided is False
    _, indices = read(prim.indices, 1)
    assert indices.size == base.faces.numel() and np.array_equal(indices, base.faces.numpy().reshape(-1))
    sampler = gltf.animations[0].samplers[0]
    channel = gltf.animations[0].channels[0]
    assert (channel.target.node, channel.target.path, sampler.interpolation) == (0, "weights", "STEP")
    acc, keys = read(sampler.input, 1)
    assert keys.tolist() == [0.0, 1.0, 2.0] and acc.min == [0.0] and acc.max == [2.0]
    _, weights = read(sampler.output, 1)
    assert weights.tolist() == [0, 0, 1, 0, 0, 1]  # one-hot per keyframe, none at keyframe 0
    # the axes are baked into the data: the node has no transform
    node = gltf.nodes[0]
    assert (node.rotation, node.matrix, node.translation, node.scale) == (None, None, None, None)

    # trimesh reads the same mesh, its linear colours and the material (it ignores the morph targets)
    scene = trimesh.load(str(path))
    (geom,) = scene.geometry.values()
    assert geom.vertices.shape == (V, 3) and geom.faces.shape == tuple(base.faces.shape)
    np.testing.assert_allclose(geom.visual.vertex_attributes["color"], colors)
    assert (geom.visual.material.metallicFactor, geom.visual.material.roughnessFactor) == (0.0, 1.0)


def test_morph_glb_from_tracking(tmp_path, moving):
    import pygltflib

    frames = moving.tracked.frame_vertices
    path = tmp_path / "tracked.glb"
    write_morph_glb(path, frames[0], moving.meshes[0].faces, frames, moving.meshes[0].vertex_colors, [0.0, 0.5, 1.0])
    gltf = pygltflib.GLTF2().load(str(path))
    targets = gltf.meshes[0].primitives[0].targets
    assert len(targets) == 2 and gltf.animations[0].samplers[0].interpolation == "LINEAR"
    # the bounds of the last target's displacements: the host's +x pole (glTF +z) moves by the motion 0.3
    assert gltf.accessors[targets[1]["POSITION"]].max[2] == pytest.approx(0.3, abs=0.01)
    # blended normals at the last keyframe (base + target) are radial about that frame's centre (0.3, 0, 0)
    blob = gltf.binary_blob()

    def read3(index):
        acc = gltf.accessors[index]
        offset = gltf.bufferViews[acc.bufferView].byteOffset
        return np.frombuffer(blob, np.float32, acc.count * 3, offset).reshape(-1, 3)

    normals = read3(gltf.meshes[0].primitives[0].attributes.NORMAL) + read3(targets[1]["NORMAL"])
    radial = y_up(frames[2].numpy() - np.array([0.3, 0.0, 0.0]))
    radial /= np.linalg.norm(radial, axis=1, keepdims=True)
    assert (normals * radial).sum(1).min() > 0.98


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=[0.0, 0.0, 1.0]), "strictly increasing"),
        (dict(times=[0.0, 1.0]), "pass N >= 2 of each"),
        (dict(interpolation="CUBICSPLINE"), "'CUBICSPLINE'"),  # a runtime type checker may raise TypeError first
        (dict(shift_first=True), r"frame_vertices\[0\] must equal base_vertices"),
    ],
)
def test_morph_glb_bad_inputs(tmp_path, moving, kwargs, match):
    base = moving.meshes[0]
    frames = [base.vertices + 0.1 * k for k in range(3)]
    if kwargs.pop("shift_first", False):
        frames[0] = frames[0] + 1.0
    args = dict(times=[0.0, 1.0, 2.0], interpolation="LINEAR") | kwargs
    with pytest.raises((ValueError, TypeError) if "CUBIC" in match else ValueError, match=match):
        write_morph_glb(tmp_path / "x.glb", base.vertices, base.faces, frames, None, **args)


def test_open_surface_gets_a_double_sided_material(tmp_path):
    import pygltflib

    # a ball cut by the bbox: marching cubes leaves the cut open
    mesh = extract_mesh(sphere((0.0, 0.0, 0.9), 0.5), BBOX, 24, threshold=0.0)
    assert wr._has_boundary(mesh.faces.numpy())
    path = tmp_path / "open.glb"
    write_morph_glb(path, mesh.vertices, mesh.faces, [mesh.vertices, mesh.vertices + 0.01], None, [0.0, 1.0])
    assert pygltflib.GLTF2().load(str(path)).materials[0].doubleSided is True


@pytest.mark.parametrize("fmt, axes", [("obj", "y_up"), ("ply", "y_up"), ("obj", "z_up")])
def test_write_mesh_sequence_roundtrip(tmp_path, moving, fmt, axes):
    import trimesh

    paths = write_mesh_sequence(tmp_path, moving.meshes, fmt=fmt, axes=axes)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"mesh_{k:04d}_t{t:.4f}.{fmt}" for k, t in enumerate([0, 0.5, 1])]
    for path, mesh in zip(paths, moving.meshes, strict=True):
        loaded = trimesh.load(path, process=False)
        expected = y_up(mesh.vertices.numpy()) if axes == "y_up" else mesh.vertices.numpy()
        np.testing.assert_allclose(loaded.vertices, expected, atol=1e-6)
        expected = (mesh.vertex_colors.numpy() * 255).round()
        np.testing.assert_allclose(loaded.visual.vertex_colors[:, :3], expected, atol=1)


# The component and normal helpers on a hand-made mesh (values worked out by hand) and on marching-cubes spheres
# (checked against closed forms and against a second, plain numpy implementation below).
HAND_VERTICES = torch.tensor(
    [[0, 0, 0], [1, 0, 0], [1, 1, 0], [2, 1, 0], [2, 2, 1], [9, 9, 9], [0, 0, 3], [1, 0, 3], [2, 0, 3]],
    dtype=torch.float32,
)
HAND_FACES = torch.tensor([[0, 1, 2], [2, 3, 4], [6, 7, 8]])  # a bowtie through vertex 2, vertex 5 unused, a sliver


def _big_and_small_sphere(p, t):
    return torch.maximum(sphere((0, 0, 0), 0.5)(p, t), sphere((0.7, 0.7, 0.7), 0.12)(p, t))


def _numpy_components(n_vertices, faces):
    """Second implementation: vertex labels of the edge-connected components (union-find over face edges)."""
    parent = list(range(n_vertices))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b, c in faces.tolist():
        for u, v in ((a, b), (b, c), (c, a)):
            parent[root(u)] = root(v)
    return np.array([root(i) for i in range(n_vertices)])


def _numpy_drop_small_components(vertices, faces, fraction):
    """Second implementation of ``_drop_small_components``: keep the faces of components holding at least
    ``fraction`` of the faces, then the referenced vertices in their original order, faces renumbered."""
    labels = _numpy_components(len(vertices), faces)
    face_label = labels[faces[:, 0].numpy()]
    sizes = {label: int((face_label == label).sum()) for label in set(face_label.tolist())}
    kept = faces.numpy()[[sizes[label] >= fraction * len(faces) for label in face_label]]
    used = np.unique(kept)
    renumber = np.full(len(vertices), -1)
    renumber[used] = np.arange(len(used))
    return vertices.numpy()[used], renumber[kept]


def _numpy_vertex_normals(vertices, faces):
    """Second implementation of ``_vertex_normals``: the sum of the adjacent faces' cross products (each face weighed
    by twice its area), normalised; zero where no face (or only degenerate ones) touches the vertex."""
    v = vertices.astype(np.float64)
    cross = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    total = np.zeros_like(v)
    for corner in range(3):
        np.add.at(total, faces[:, corner], cross)
    length = np.linalg.norm(total, axis=1, keepdims=True)
    return np.where(length > 0, total / np.where(length > 0, length, 1.0), 0.0)


def test_topology_and_component_helpers():
    """Catches a component count or Euler characteristic taken over the wrong graph (unreferenced vertices counted,
    faces instead of edges), and small-component dropping that drops the wrong part, reorders vertices or faces, or
    keeps unreferenced vertices."""
    hand = mx.Mesh(HAND_VERTICES, HAND_FACES, None, 0.0, 0.0, 1.0)
    assert topology_signature(hand) == (2, 2)  # the bowtie is one component; 8 used vertices - 9 edges + 3 faces
    vertices, faces = mx._drop_small_components(HAND_VERTICES, HAND_FACES, 0.4)  # the 1-face sliver goes
    torch.testing.assert_close(vertices, HAND_VERTICES[:5], rtol=0, atol=0)
    assert faces.tolist() == [[0, 1, 2], [2, 3, 4]] and faces.dtype == torch.int64
    mesh = extract_mesh(_big_and_small_sphere, BBOX, 24, threshold=0.0)
    n_vertices, n_faces = mesh.vertices.shape[0], mesh.faces.shape[0]
    # two closed genus-0 surfaces: chi = 2 + 2; closed triangle meshes have 3F = 2E, so V - F / 2 = chi
    assert topology_signature(mesh) == (2, 4) and n_faces == 2 * n_vertices - 8
    assert len(set(_numpy_components(n_vertices, mesh.faces).tolist())) == 2
    vertices, faces = mx._drop_small_components(mesh.vertices, mesh.faces, 0.1)
    ref_vertices, ref_faces = _numpy_drop_small_components(mesh.vertices, mesh.faces, 0.1)
    np.testing.assert_array_equal(vertices.numpy(), ref_vertices)
    np.testing.assert_array_equal(faces.numpy(), ref_faces)
    # what is left is the big sphere alone (radius 0.5 about the origin), closed: F = 2V - 4
    voxel = 2.0 / 23
    assert (vertices.norm(dim=-1) - 0.5).abs().max() < 0.25 * voxel
    assert faces.shape[0] == 2 * vertices.shape[0] - 4 and faces.shape[0] < n_faces


def test_vertex_normals():
    """Catches normals that are not area-weighted, point inwards, are left unnormalised, or are non-zero at
    vertices without faces."""
    normals = wr._vertex_normals(HAND_VERTICES.numpy(), HAND_FACES.numpy().astype(np.uint32))
    s, h = 1 / 5**0.5, 0.5**0.5  # vertex 2: face cross products (0, 0, 1) + (0, -1, 1) = (0, -1, 2), unit
    expected = [[0, 0, 1], [0, 0, 1], [0, -s, 2 * s], [0, -h, h], [0, -h, h]] + [[0] * 3] * 4
    assert normals.dtype == np.float32
    np.testing.assert_allclose(normals, np.array(expected, dtype=np.float32), rtol=0, atol=1e-7)
    mesh = extract_mesh(_big_and_small_sphere, BBOX, 24, threshold=0.0)
    vertices, faces = mesh.vertices.numpy(), mesh.faces.numpy()
    normals = wr._vertex_normals(vertices, faces.astype(np.uint32))
    np.testing.assert_allclose(normals, _numpy_vertex_normals(vertices, faces), rtol=0, atol=1e-6)
    # on the spheres the normals point outwards along the radius
    big = np.linalg.norm(vertices, axis=1) < 0.75
    centres = np.where(big[:, None], 0.0, np.array([[0.7, 0.7, 0.7]]))
    radial = (vertices - centres) / np.linalg.norm(vertices - centres, axis=1, keepdims=True)
    assert (np.sum(normals * radial, axis=1) > 0.9).all()  # the small sphere is only ~3 voxels across
