"""The exported files in tools we did not write: the Khronos glTF validator (0 errors, 0 warnings) and trimesh (the
.glb reloads with its material and colours; its keyframe meshes, base + one-hot morph targets, are the tracked
frames and lie on the per-time OBJ meshes, in the same axes). The synthetic scene's analytic density is exported."""
import numpy as np
import pytest
import torch

from animate124.core.export.fidelity import sample_mesh_surface
from animate124.core.export.mesh_export import build_mesh_animation
from animate124.core.export.writers import read_morph_glb, to_y_up, write_mesh_sequence, write_morph_glb
from animate124.testing.synthetic_scene import SURFACE_DENSITY, blobs_scene

TIMES = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    animation = build_mesh_animation(lambda p, t: blobs_scene(p, t)[0], torch.tensor([[-1.0] * 3, [1.0] * 3]),
                                     TIMES, resolution=40, threshold=SURFACE_DENSITY,
                                     color_fn=lambda p, t: blobs_scene(p, t)[1])
    assert animation.morph_ok, animation.reason
    base = animation.meshes[0]
    glb = out / "mesh.glb"
    write_morph_glb(glb, base.vertices, base.faces, animation.tracked.frame_vertices, base.vertex_colors,
                    [t * 63 / 16 for t in TIMES])
    objs = write_mesh_sequence(out / "mesh", animation.meshes)
    return animation, glb, objs


def test_khronos_validator_reports_no_errors_and_no_warnings(exported):
    from web_tools import validate_gltf

    report = validate_gltf(exported[1])
    issues = report["issues"]
    print({k: issues[k] for k in ("numErrors", "numWarnings", "numInfos", "numHints")}, report["validatorVersion"])
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), issues["messages"]
    info = report["info"]
    assert (info["animationCount"], info["materialCount"], info["hasMorphTargets"], info["drawCallCount"]) == (
        1, 1, True, 1)
    assert info["totalVertexCount"] == exported[0].meshes[0].vertices.shape[0]


def test_validator_catches_a_broken_file(exported, tmp_path):
    """The validator check is not vacuous: a .glb with a truncated binary chunk is reported."""
    from web_tools import validate_gltf

    data = exported[1].read_bytes()
    broken = tmp_path / "broken.glb"
    broken.write_bytes(data[: len(data) - 64])
    assert validate_gltf(broken)["issues"]["numErrors"] > 0


def test_trimesh_reloads_the_glb_and_its_morph_frames_match_the_per_time_meshes(exported):
    import trimesh

    animation, glb, objs = exported
    base = animation.meshes[0]
    voxel = base.voxel_size
    scene = trimesh.load(str(glb))
    (mesh,) = scene.geometry.values()
    # trimesh: the base mesh in the .glb's axes (y up), the t = 0 OBJ's vertices and faces exactly
    obj0 = trimesh.load(objs[0], process=False)
    np.testing.assert_allclose(mesh.vertices, obj0.vertices, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces, obj0.faces)
    assert (mesh.visual.material.metallicFactor, mesh.visual.material.roughnessFactor) == (0.0, 1.0)
    # y up: the moving sphere (host y > 0.03) sits at glTF x > 0; everything lies above the host's z = -0.45
    np.testing.assert_allclose(mesh.vertices, to_y_up(base.vertices.numpy()), atol=1e-6)
    # keyframe meshes = base + one-hot targets = the tracked frames, and each lies on its time's OBJ surface
    from scipy.spatial import cKDTree

    gen = torch.Generator().manual_seed(0)
    decoded = read_morph_glb(glb)
    assert decoded.keys.tolist() == pytest.approx([t * 63 / 16 for t in TIMES])
    for k, path in enumerate(objs):
        np.testing.assert_allclose(decoded.frames[k], to_y_up(animation.tracked.frame_vertices[k].numpy()), atol=1e-5)
        obj = trimesh.load(path, process=False)
        # vertices of one to dense samples of the other (spacing ~0.05 voxel): point-to-surface distances both ways
        frame = torch.from_numpy(decoded.frames[k])
        obj_v, obj_f = torch.from_numpy(np.asarray(obj.vertices)), torch.from_numpy(np.asarray(obj.faces))
        forward = cKDTree(sample_mesh_surface(obj_v, obj_f, 200_000, gen).numpy()).query(frame.numpy())[0] / voxel
        backward = cKDTree(sample_mesh_surface(frame, torch.from_numpy(decoded.faces), 200_000, gen).numpy()).query(
            obj_v.numpy())[0] / voxel
        print(k, forward.mean(), forward.max(), backward.mean(), backward.max())
        # means well under a voxel; the largest within the tracker's tolerance (1.5 voxels)
        assert max(forward.mean(), backward.mean()) < 0.15 and max(forward.max(), backward.max()) < 1.5, k
        if k:  # the scene moved: keyframe k is not the base mesh
            assert np.linalg.norm(decoded.frames[k] - decoded.frames[0], axis=1).max() > 3 * voxel
