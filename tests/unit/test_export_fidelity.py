"""Export fidelity against a known answer: a DynamicField fit to the synthetic 4D scene, exported (.glb + OBJs), read
back and compared with the scene's analytic surface at every time (benchmarks/export_fidelity.py, CPU size).

Measured with this configuration on the 2-core dev machine (seed 0; 30 s of CPU time on one thread): Chamfer
0.13-0.19 voxel per time (.glb and .obj), the sphere's displacement within 0.28 voxel of the analytic one (it moves
7-11 voxels between times); the reversed control: Chamfer 4.1-6.2 voxels, displacement errors >= 11 voxels.
Tolerances: export_fidelity.TOLERANCES (Chamfer <= 0.5 voxel, motion <= 0.5 voxel, reversed >= 4x and >= 2 voxels).
"""
import pytest
import torch
from export_fidelity import CPU_CONFIG, TOLERANCES, format_table, run_fidelity


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the figures above: one thread
    try:
        yield run_fidelity(**CPU_CONFIG, out_dir=str(tmp_path_factory.mktemp("fidelity")))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(600)
def test_exported_meshes_match_the_analytic_surface_and_motion(fidelity):
    print("\n" + format_table(fidelity))
    rows, summary = fidelity["per_time"], fidelity["summary"]
    assert [r["t"] for r in rows] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    # keyframe seconds: t * (64 - 1) / 16
    assert [r["seconds"] for r in rows] == pytest.approx([0.0, 1.3125, 2.625, 3.9375], abs=1e-6)
    for r in rows:
        assert r["chamfer_glb_voxels"] <= TOLERANCES["chamfer_voxels"], r
        assert r["chamfer_obj_voxels"] <= TOLERANCES["chamfer_voxels"], r
    for r in rows[1:]:
        assert r["displacement_voxels"] > 5.0  # the scene really moves: several voxels between exported times
        assert r["displacement_error_voxels"] <= TOLERANCES["displacement_voxels"], r
    assert summary["passed"]


def test_reversed_frames_score_clearly_worse(fidelity):
    rows, summary = fidelity["per_time"], fidelity["summary"]
    for r in rows:  # every time: 4 times has no middle frame, so reversal changes each one
        assert r["chamfer_reversed_voxels"] > 4 * r["chamfer_glb_voxels"] and r["chamfer_reversed_voxels"] > 2.0, r
    assert summary["mean_chamfer_reversed_voxels"] >= TOLERANCES["reversed_ratio"] * summary["mean_chamfer_glb_voxels"]
    assert summary["min_displacement_error_reversed_voxels"] > 10 * TOLERANCES["displacement_voxels"]


def test_the_exported_glb_passes_the_khronos_validator(fidelity):
    from web_tools import validate_gltf

    report = validate_gltf(fidelity["files"]["glb"])
    issues = report["issues"]
    assert (issues["numErrors"], issues["numWarnings"]) == (0, 0), issues["messages"]
    info = report["info"]
    assert (info["animationCount"], info["materialCount"], info["hasMorphTargets"]) == (1, 1, True)
