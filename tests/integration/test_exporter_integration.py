"""a124-mesh-sequence-exporter through real threestudio: per-time meshes, the morph-target .glb, the --export flow."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from animate124.core.export.writers import from_y_up, srgb_to_linear

GEOMETRY = {
    "radius": 1.0,
    "pos_encoding_config": {"n_levels": 4, "log2_hashmap_size": 12, "base_resolution": 8, "per_level_scale": 1.5,
                            "implementation": "torch"},
    "isosurface_threshold": 5.0,
}
TIMES = [0.0, 0.5, 1.0]
THRESHOLD = 5.0


def _parts(threestudio):
    torch.manual_seed(0)
    geometry = threestudio.find("a124-4d-volume")(GEOMETRY)
    with torch.no_grad():
        # a smooth, time-varying change of the blob (scale 10, std 0.5: the density-5 surface starts near |x| = 0.25)
        geometry.encoding_time.embeddings.normal_(0, 0.3)
    material = threestudio.find("no-material")({"n_output_dims": 3, "color_activation": "sigmoid"})
    background = threestudio.find("solid-color-background")({"color": [1.0, 1.0, 1.0]})
    return geometry, material, background


def _export(threestudio, geometry, material, background, **cfg):
    cfg = {"times": TIMES, "resolution": 32, **cfg}
    exporter = threestudio.find("a124-mesh-sequence-exporter")(
        cfg, geometry=geometry, material=material, background=background
    )
    return exporter, exporter()


def _density(geometry, vertices, t):
    with torch.no_grad():
        return geometry.forward_density(torch.as_tensor(vertices, dtype=torch.float32), times=t)[:, 0]


def test_meshes_per_time_and_one_morph_glb(threestudio):
    import pygltflib
    import trimesh

    geometry, material, background = _parts(threestudio)
    exporter, outputs = _export(threestudio, geometry, material, background)
    names = [o.save_name for o in outputs]
    assert names == [f"mesh/mesh_{k:04d}_t{t:.4f}.obj" for k, t in enumerate(TIMES)] + ["mesh.glb"], names
    assert all(o.save_type == "file" and Path(o.params["src_path"]).is_file() for o in outputs)
    # the threshold came from geometry.cfg.isosurface_threshold
    assert exporter.threshold == THRESHOLD

    # each mesh lies on the density-5 level set of its own time; colours are the material's at those points. The
    # files are y up (glTF's axes): from_y_up gives back the training frame
    meshes = [trimesh.load(o.params["src_path"], process=False) for o in outputs[:3]]
    for mesh, t in zip(meshes, TIMES):
        density = _density(geometry, from_y_up(mesh.vertices), t)
        assert (density - THRESHOLD).abs().mean() < 0.15, (t, (density - THRESHOLD).abs().mean())
        with torch.no_grad():
            pts = torch.as_tensor(from_y_up(mesh.vertices), dtype=torch.float32)
            expected = torch.sigmoid(geometry.export(pts, times=t)["features"]).numpy()
        colors = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
        np.testing.assert_allclose(colors, expected, atol=1.5 / 255)
    # the shape moves: the t = 1 surface differs from the t = 0 one
    assert abs(len(meshes[0].vertices) - len(meshes[2].vertices)) > 0 or not np.allclose(
        meshes[0].vertices.mean(0), meshes[2].vertices.mean(0)
    )

    # the .glb: one mesh with the t = 0 topology, N - 1 morph targets, colours, one animation over N keyframes
    gltf = pygltflib.GLTF2().load(outputs[-1].params["src_path"])
    blob = gltf.binary_blob()

    def read(index, width):
        acc = gltf.accessors[index]
        view = gltf.bufferViews[acc.bufferView]
        dtype = np.float32 if acc.componentType == 5126 else np.uint32
        data = np.frombuffer(blob, dtype=dtype, count=acc.count * width, offset=view.byteOffset + (acc.byteOffset or 0))
        return data.reshape(acc.count, width) if width > 1 else data

    (prim,) = gltf.meshes[0].primitives
    base = read(prim.attributes.POSITION, 3)
    assert base.shape[0] == len(meshes[0].vertices)
    assert len(prim.targets) == len(TIMES) - 1
    assert prim.attributes.COLOR_0 is not None
    # COLOR_0 is linear (glTF), the OBJ's 8-bit colours sRGB: the same albedo (d linear / d sRGB <= 2.4)
    np.testing.assert_allclose(read(prim.attributes.COLOR_0, 3),
                               srgb_to_linear(np.asarray(meshes[0].visual.vertex_colors)[:, :3] / 255.0),
                               atol=2.4 * 0.5 / 255 + 1e-6)
    keys = read(gltf.animations[0].samplers[0].input, 1)
    np.testing.assert_allclose(keys, np.asarray(TIMES) * 63 / 16)  # 64 frames at 16 fps over t in [0, 1]
    assert gltf.animations[0].extras == {"fps": 16.0, "clip_frames": 64, "frame_times": TIMES}
    # the .glb and the OBJs share the axes (y up): the t = 0 OBJ is the .glb's base mesh
    np.testing.assert_allclose(base, meshes[0].vertices, atol=1e-6)
    pbr = gltf.materials[0].pbrMetallicRoughness
    assert (pbr.metallicFactor, pbr.roughnessFactor) == (0.0, 1.0)
    for k, t in enumerate(TIMES[1:], start=1):
        target = prim.targets[k - 1]  # pygltflib loads targets as dicts
        moved = base + read(target["POSITION"] if isinstance(target, dict) else target.POSITION, 3)
        assert np.abs(moved - base).max() > 1e-3  # the tracked surface moved
        residual = (_density(geometry, from_y_up(moved), t) - THRESHOLD).abs().mean()
        assert residual < 0.15, (t, residual)  # ... onto that time's level set
    tm = trimesh.load(outputs[-1].params["src_path"], force="mesh", process=False)
    assert len(tm.vertices) == base.shape[0]


def test_exported_glb_passes_the_khronos_validator_and_z_up_keeps_the_training_frame(threestudio):
    import trimesh
    from web_tools import validate_gltf

    geometry, material, background = _parts(threestudio)
    _, outputs = _export(threestudio, geometry, material, background, axes="z_up", fps=8.0, clip_frames=16)
    issues = validate_gltf(outputs[-1].params["src_path"])["issues"]
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), issues["messages"]
    mesh = trimesh.load(outputs[0].params["src_path"], process=False)
    assert (_density(geometry, mesh.vertices, 0.0) - THRESHOLD).abs().mean() < 0.15  # no axis change
    import pygltflib

    keys = pygltflib.GLTF2().load(outputs[-1].params["src_path"])
    assert keys.animations[0].extras["fps"] == 8.0 and keys.accessors[keys.animations[0].samplers[0].input].max == [
        pytest.approx(15 / 8)]


def test_topology_that_cannot_follow_writes_sequence_only_and_warns(threestudio, monkeypatch):
    geometry, material, background = _parts(threestudio)
    warnings = []
    monkeypatch.setattr(threestudio, "warn", lambda msg, *a, **k: warnings.append(msg))
    # a tolerance no tracked frame can meet: every later frame fails the check
    _, outputs = _export(threestudio, geometry, material, background, tolerance_voxels=1e-6)
    assert [o.save_name.endswith(".obj") for o in outputs] == [True] * len(TIMES)
    assert any("no animated mesh.glb" in w and "voxels off" in w for w in warnings), warnings


def test_bad_times_fail_at_configure(threestudio):
    geometry, material, background = _parts(threestudio)
    with pytest.raises(ValueError, match="strictly increasing"):
        threestudio.find("a124-mesh-sequence-exporter")({"times": [0.5, 0.2]}, geometry=geometry, material=material,
                                                         background=background)


def test_system_export_flow_writes_into_it_export(threestudio, tiny_models, example_rgba, tmp_path, monkeypatch):
    from test_system_integration import _config
    from threestudio.utils.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(_config(tiny_models, example_rgba, tmp_path), from_string=True)
    cfg.system.exporter_type = "a124-mesh-sequence-exporter"
    cfg.system.exporter = {"n_times": 2, "resolution": 24, "threshold": THRESHOLD}
    system = threestudio.find(cfg.system_type)(cfg.system)
    system.set_save_dir(str(tmp_path / "save"))
    system.on_predict_start()
    system.on_predict_epoch_end()
    export = tmp_path / "save" / f"it{system.true_global_step}-export"
    files = sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file())
    assert files == ["mesh.glb", "mesh/mesh_0000_t0.0000.obj", "mesh/mesh_0001_t1.0000.obj"], files


@pytest.mark.parametrize("normal_type, difference", [("finite_difference", "central"),
                                                     ("finite_difference_laplacian", "central"),
                                                     ("finite_difference_forward", "forward")])
def test_geometry_normal_type_picks_the_finite_difference(threestudio, normal_type, difference):
    geometry = threestudio.find("a124-4d-volume")({**GEOMETRY, "normal_type": normal_type})
    assert geometry.field.normal_difference == difference


def test_geometry_rejects_an_unknown_normal_type(threestudio):
    with pytest.raises(ValueError, match=r"normal_type='analytic'.*finite_difference_forward"):
        threestudio.find("a124-4d-volume")({**GEOMETRY, "normal_type": "analytic"})
